"""Sparse decode over FP8 pools (flash_mla_with_kvcache with indices): the CPU handler against the
pure-JAX reference over the dequantised pools, with FlashMLA's tolerances, over page sizes, topk,
batch, query tokens, head counts, both pool formats, the extra pool, topk_length, the attention sink,
empty rows and NaN in unread slots; its errors (an index outside the pool, argument conflicts); jit,
vmap over q and over pools, and the gradient in q."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as fm
from sparse_cases import LSE_TOL, OUT_TOL, assert_close, check, make_case, reference, run

D_QK = {"v32": 576, "model1": 512}


# ---- the handler against the reference -----------------------------------------------------------------

CASES = [
    # format, batch, s_q, heads, page, topk, topk_length, sink, extra (page, topk, lengths), empty rows
    ("v32", 1, 1, 1, 2, 64, False, False, None, 0),
    ("v32", 4, 3, 8, 61, 64, True, True, None, 2),
    ("v32", 1, 3, 16, 64, 576, False, True, (69, 64, True), 0),
    ("v32", 4, 1, 64, 69, 576, True, False, None, 1),
    ("v32", 4, 3, 128, 64, 64, False, False, (2, 64, False), 0),
    ("v32", 1, 1, 8, 64, 2048, True, True, None, 0),
    ("model1", 1, 1, 1, 2, 64, False, True, None, 0),
    ("model1", 4, 3, 8, 61, 64, True, False, (2, 64, False), 2),
    ("model1", 1, 3, 16, 64, 576, False, False, None, 0),
    ("model1", 4, 1, 64, 69, 576, True, True, (61, 576, True), 1),
    ("model1", 1, 3, 128, 64, 64, False, True, (64, 64, True), 0),
]


@pytest.mark.parametrize("fmt,batch,seqlen_q,heads,page,topk,lengths,sink,extra,empty_rows", CASES)
def test_matches_reference(rng, fmt, batch, seqlen_q, heads, page, topk, lengths, sink, extra, empty_rows):
    check(make_case(rng, fmt, batch=batch, seqlen_q=seqlen_q, heads=heads, page=page, topk=topk, lengths=lengths,
                    sink=sink, extra=extra, empty_rows=empty_rows))


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_uint8_pool_and_scale(rng, fmt):
    """A uint8 pool (the same bytes) and an explicit softmax_scale give the same result."""
    kwargs = make_case(rng, fmt, batch=2, seqlen_q=2, heads=8, page=64, topk=64, dtype=jnp.uint8)
    check(kwargs, softmax_scale=0.3)
    as_fp8 = dict(kwargs, k_cache=jax.lax.bitcast_convert_type(kwargs["k_cache"], jnp.float8_e4m3fn))
    for a, b in zip(run(kwargs, 0.3), run(as_fp8, 0.3)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_deepseek_v32_shape(rng):
    """DeepSeek-V3.2's decode: 128 heads, d_qk 576, 2 query tokens, topk 2048."""
    check(make_case(rng, "v32", batch=2, seqlen_q=2, heads=128, page=64, topk=2048, invalid=0.05))


def test_deepseek_v4_shape(rng):
    """DeepSeek-V4's decode: d_qk 512, topk 128 over pages of 256 plus 512 extra tokens over pages of 64,
    with topk lengths and a sink."""
    check(make_case(rng, "model1", batch=2, seqlen_q=1, heads=64, page=256, topk=128, lengths=True, sink=True,
                    extra=(64, 512, True), invalid=0.05))


# ---- conventions ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_empty_rows(rng, fmt):
    """Rows without a valid entry (all -1, or topk_length 0) give out 0 and lse +inf, sink or not."""
    kwargs = make_case(rng, fmt, batch=3, seqlen_q=2, heads=8, page=61, topk=64, sink=True)
    ids = np.array(kwargs["indices"])
    ids[0] = -1
    kwargs.update(indices=jnp.asarray(ids), topk_length=jnp.asarray([64, 0, 64], jnp.int32),
                  attn_sink=jnp.asarray([np.inf, -np.inf, 0, 1, 2, np.inf, -3, 0], jnp.float32))
    out, lse = check(kwargs)
    assert np.all(np.asarray(out[:2], np.float32) == 0) and np.all(np.asarray(lse[:2]) == np.inf)
    assert np.all(np.isfinite(np.asarray(lse[2])))
    # +inf sink zeroes the head, -inf leaves it as without a sink.
    no_sink_out, _ = run(dict(kwargs, attn_sink=None))
    assert np.all(np.asarray(out[2, :, 0], np.float32) == 0)
    np.testing.assert_array_equal(np.asarray(out[2, :, 1], np.float32), np.asarray(no_sink_out[2, :, 1], np.float32))


def test_topk_length_out_of_range(rng):
    """A negative topk_length reads nothing, one past topk reads every entry (as the reference)."""
    kwargs = make_case(rng, "model1", batch=3, seqlen_q=1, heads=4, page=64, topk=64, extra=(64, 64, False))
    odd = run(dict(kwargs, topk_length=jnp.asarray([-3, 100, 2 ** 31 - 1], jnp.int32),
                   extra_topk_length=jnp.asarray([2 ** 31 - 1, -(2 ** 31), 64], jnp.int32)))
    plain = run(dict(kwargs, topk_length=jnp.asarray([0, 64, 64], jnp.int32),
                     extra_topk_length=jnp.asarray([64, 0, 64], jnp.int32)))
    for a, b in zip(odd, plain):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    check(dict(kwargs, topk_length=jnp.asarray([-3, 100, 2 ** 31 - 1], jnp.int32)))


def test_nan_in_q_propagates(rng):
    kwargs = make_case(rng, "v32", batch=2, seqlen_q=1, heads=4, page=64, topk=64, invalid=0.0)
    q = np.array(kwargs["q"].astype(jnp.float32))
    q[1, 0, 2, 7] = np.nan
    kwargs["q"] = jnp.asarray(q, jnp.bfloat16)
    out, lse = run(kwargs)
    assert np.all(np.isnan(np.asarray(out[1, 0, 2], np.float32))) and np.isnan(lse[1, 2, 0])
    assert np.all(np.isfinite(np.asarray(out, np.float32)[0])) and np.all(np.isfinite(np.asarray(lse[0])))
    check(kwargs)


def run_now(kwargs):
    return jax.block_until_ready(run(kwargs))


def test_out_of_pool_index_is_an_error(rng):
    kwargs = make_case(rng, "model1", batch=2, seqlen_q=3, heads=8, page=61, topk=64, invalid=0.0,
                       extra=(2, 64, False))
    num_slots = kwargs["k_cache"].shape[0] * 61
    ids = np.array(kwargs["indices"])
    ids[1, 2, 5] = num_slots
    with pytest.raises(Exception, match=rf"indices: request 1, query token 2, position 5 holds slot {num_slots}, "
                                        rf"outside the {num_slots} slots of k_cache"):
        run_now(dict(kwargs, indices=jnp.asarray(ids)))
    ids[1, 2, 5] = -2
    with pytest.raises(Exception, match="request 1, query token 2, position 5 holds slot -2"):
        run_now(dict(kwargs, indices=jnp.asarray(ids)))
    # Past topk_length an entry is never read, whatever it holds.
    run_now(dict(kwargs, indices=jnp.asarray(ids), topk_length=jnp.asarray([64, 5], jnp.int32)))
    extra_ids = np.array(kwargs["extra_indices_in_kvcache"])
    extra_ids[0, 1, 63] = 2 ** 31 - 1
    with pytest.raises(Exception, match="extra_indices_in_kvcache: request 0, query token 1, position 63 .* "
                                        "slots of extra_k_cache"):
        run_now(dict(kwargs, extra_indices_in_kvcache=jnp.asarray(extra_ids)))


# ---- argument errors -----------------------------------------------------------------------------------

def _error_cases(rng):
    base = make_case(rng, "v32", batch=2, seqlen_q=1, heads=4, page=64, topk=64, extra=(64, 64, False))
    model1 = make_case(rng, "model1", batch=2, seqlen_q=1, heads=4, page=64, topk=64)
    q, pool = base["q"], base["k_cache"]
    call = lambda **kw: fm.flash_mla_with_kvcache(**{**dict(q=q, k_cache=pool, block_table=None, cache_seqlens=None,
                                                            is_fp8_kvcache=True, indices=base["indices"]), **kw})
    return [
        ("causal", lambda: call(causal=True)),
        ("is_fp8_kvcache: expected True", lambda: call(is_fp8_kvcache=False)),
        ("is_fp8_kvcache: expected a Python bool", lambda: call(is_fp8_kvcache=1)),
        ("q: expected dtype bfloat16", lambda: call(q=q.astype(jnp.float16))),
        ("q: expected head dim", lambda: call(q=q[..., :448])),
        ("k_cache: expected a v32 pool .* for q's head dim 576, got 576-byte rows .a model1 pool",
         lambda: call(k_cache=model1["k_cache"])),
        ("k_cache: expected 656 bytes a row", lambda: call(k_cache=jnp.zeros((2, 64, 1, 600), jnp.uint8))),
        ("k_cache: expected dtype", lambda: call(k_cache=pool.astype(jnp.float32))),
        ("k_cache: expected rows per page", lambda: call(k_cache=jnp.zeros((3, 74, 1, 576), jnp.uint8),
                                                          q=model1["q"], indices=model1["indices"])),
        ("indices: expected shape", lambda: call(indices=base["indices"][:, :, None, :])),
        ("indices: expected dtype int32", lambda: call(indices=base["indices"].astype(jnp.int16))),
        ("topk_length: expected shape", lambda: call(topk_length=jnp.zeros((3,), jnp.int32))),
        ("topk_length: expected dtype", lambda: call(topk_length=jnp.zeros((2,), jnp.float32))),
        ("attn_sink: expected shape", lambda: call(attn_sink=jnp.zeros((8,), jnp.float32))),
        ("attn_sink: expected dtype float32", lambda: call(attn_sink=jnp.zeros((4,), jnp.bfloat16))),
        ("extra_k_cache: expected k_cache's format v32", lambda: call(extra_k_cache=model1["k_cache"],
                                                                      extra_indices_in_kvcache=base["indices"])),
        ("extra_indices_in_kvcache: expected an array", lambda: call(extra_k_cache=base["extra_k_cache"])),
        ("extra_indices_in_kvcache: expected None", lambda: call(extra_indices_in_kvcache=base["indices"])),
        ("extra_topk_length: expected shape", lambda: call(extra_k_cache=base["extra_k_cache"],
                                                           extra_indices_in_kvcache=base["extra_indices_in_kvcache"],
                                                           extra_topk_length=jnp.zeros((2, 1), jnp.int32))),
        ("head_dim_v", lambda: call(head_dim_v=576)),
        ("softmax_scale", lambda: call(softmax_scale=-1.0)),
        # Dense mode (over an FP8 pool too) refuses the sparse-only arguments.
        ("attn_sink: expected None without indices",
         lambda: call(indices=None, block_table=jnp.zeros((2, 1), jnp.int32), cache_seqlens=jnp.ones((2,), jnp.int32),
                      attn_sink=jnp.zeros((4,), jnp.float32))),
        ("attn_sink: expected None without indices", lambda: call(indices=None, is_fp8_kvcache=False,
                                                                  attn_sink=jnp.zeros((4,), jnp.float32))),
        ("topk_length: expected None without indices", lambda: call(indices=None, is_fp8_kvcache=False,
                                                                    topk_length=jnp.zeros((2,), jnp.int32))),
    ]


def test_argument_errors(rng):
    for message, call in _error_cases(rng):
        with pytest.raises(fm.ContractError, match=message):
            call()


# ---- transformations -----------------------------------------------------------------------------------

def test_jit(rng):
    kwargs = make_case(rng, "v32", batch=2, seqlen_q=2, heads=8, page=61, topk=64, lengths=True, sink=True,
                       extra=(2, 64, True))
    f = jax.jit(lambda kw: run(kw, 0.1))
    for a, b in zip(f(kwargs), run(kwargs, 0.1)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _stack(cases, key):
    return None if cases[0].get(key) is None else jnp.stack([c[key] for c in cases])


def test_vmap_over_q(rng):
    kwargs = make_case(rng, "model1", batch=2, seqlen_q=1, heads=8, page=61, topk=64, lengths=True, sink=True)
    qs = jnp.stack([kwargs["q"], -kwargs["q"], kwargs["q"] * 0.5])
    out, lse = jax.vmap(lambda q: run(dict(kwargs, q=q)))(qs)
    for m in range(3):
        want_out, want_lse = run(dict(kwargs, q=qs[m]))
        np.testing.assert_array_equal(np.asarray(out[m], np.float32), np.asarray(want_out, np.float32))
        np.testing.assert_array_equal(np.asarray(lse[m]), np.asarray(want_lse))


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_vmap_over_pools(rng, fmt):
    """Mapped pools (main and extra), indices, lengths and sinks: each member as its own call."""
    cases = [make_case(rng, fmt, batch=2, seqlen_q=2, heads=4, page=61, topk=64, lengths=True, sink=True,
                       extra=(2, 64, True)) for _ in range(3)]
    keys = ("q", "k_cache", "indices", "topk_length", "attn_sink", "extra_k_cache", "extra_indices_in_kvcache",
            "extra_topk_length")
    stacked = {k: _stack(cases, k) for k in keys}
    out, lse = jax.vmap(run)(stacked)
    for m, case in enumerate(cases):
        want_out, want_lse = run(case)
        np.testing.assert_array_equal(np.asarray(lse[m]), np.asarray(want_lse))
        # A mapped sink is applied outside the call, after out's bfloat16 rounding: one more rounding.
        assert_close("out", out[m], want_out, atol=1e-6, rtol=2.0 ** -7)
    # Mapped pools, shared q: ids stay within their member's pool.
    shared = {**stacked, "q": cases[0]["q"], "attn_sink": cases[0]["attn_sink"]}
    out, lse = jax.vmap(run, in_axes=({**{k: 0 for k in keys}, "q": None, "attn_sink": None},))(shared)
    for m, case in enumerate(cases):
        want_out, want_lse = run({**case, "q": cases[0]["q"], "attn_sink": cases[0]["attn_sink"]})
        np.testing.assert_array_equal(np.asarray(out[m], np.float32), np.asarray(want_out, np.float32))
        np.testing.assert_array_equal(np.asarray(lse[m]), np.asarray(want_lse))


def test_vmap_keeps_out_of_pool_errors(rng):
    cases = [make_case(rng, "v32", batch=1, seqlen_q=1, heads=4, page=64, topk=64, invalid=0.0) for _ in range(2)]
    ids = np.array(cases[0]["indices"])
    ids[0, 0, 3] = 3 * 64  # the first slot of member 1's pool once folded: must still be an error
    cases[0]["indices"] = jnp.asarray(ids)
    stacked = {k: jnp.stack([c[k] for c in cases]) for k in ("q", "k_cache", "indices")}
    with pytest.raises(Exception, match="outside the 384 slots of k_cache"):
        jax.block_until_ready(jax.vmap(run)(stacked))


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_grad_in_q(rng, fmt):
    kwargs = make_case(rng, fmt, batch=2, seqlen_q=2, heads=4, page=61, topk=64, lengths=True, sink=True,
                       extra=(2, 64, False), empty_rows=1)
    weights = jnp.asarray(rng.standard_normal((2, 2, 4, 512)), jnp.float32)

    def loss(f, q):
        out, lse = f(dict(kwargs, q=q))
        return jnp.sum(out.astype(jnp.float32) * weights) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    q = kwargs["q"]
    got = jax.grad(functools.partial(loss, run))(q)
    want = jax.grad(functools.partial(loss, reference))(q)
    assert got.dtype == jnp.bfloat16
    assert_close("dq", got, want, atol=1e-3, rtol=2.01 / 128, cos_tol=5e-6)
    assert np.abs(np.asarray(got, np.float32)).max() > 0


def test_grad_in_sink(rng):
    kwargs = make_case(rng, "v32", batch=2, seqlen_q=1, heads=4, page=64, topk=64, empty_rows=1)
    kwargs["attn_sink"] = jnp.asarray([0.5, -1.0, 2.0, -np.inf], jnp.float32)
    loss = lambda f, sink: jnp.sum(f(dict(kwargs, attn_sink=sink))[0].astype(jnp.float32))
    got = jax.grad(functools.partial(loss, run))(kwargs["attn_sink"])
    want = jax.grad(functools.partial(loss, reference))(kwargs["attn_sink"])
    assert_close("d_sink", got, want, atol=1e-5, rtol=1e-4)
    assert np.all(np.asarray(got[:3]) != 0)


def test_no_grad_in_pool(rng):
    kwargs = make_case(rng, "v32", batch=1, seqlen_q=1, heads=4, page=64, topk=64)
    loss = lambda pool: jnp.sum(run(dict(kwargs, k_cache=pool))[1])
    with pytest.raises(Exception, match="k_cache: an FP8 KV-cache pool is not differentiable"):
        jax.grad(loss)(kwargs["k_cache"])


# ---- the op's pure-JAX path and the README -------------------------------------------------------------

def test_fallback_matches_handler(rng):
    """What GPUs and other platforms run (the reference over the dequantised pools) against the CPU handler."""
    from jax_flashmla.ops import sparse_decode

    kwargs = make_case(rng, "model1", batch=2, seqlen_q=2, heads=8, page=69, topk=64, lengths=True, sink=True,
                       extra=(2, 64, True))
    out, lse = run(kwargs)
    operands = (kwargs["q"], kwargs["k_cache"], kwargs["indices"], kwargs["topk_length"], kwargs["attn_sink"],
                kwargs["extra_k_cache"], kwargs["extra_indices_in_kvcache"], kwargs["extra_topk_length"])
    want_out, want_lse = jax.jit(functools.partial(sparse_decode.reference_over_pools,
                                                   softmax_scale=512 ** -0.5))(*operands)
    assert_close("lse", lse, want_lse, **LSE_TOL)
    assert_close("out", out, want_out, **OUT_TOL)


def test_readme_snippet_runs():
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Sparse decode", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md (Sparse decode)", "exec"), {})


def test_named_shardings_give_the_unsharded_result(rng):
    """A batch- and head-split call with a whole pool gives the unsharded result (the partitioned
    forms, one by one, and their compiled modules: tests/test_sparse_sharding.py)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    kwargs = make_case(rng, "v32", batch=4, seqlen_q=1, heads=8, page=64, topk=64, sink=True)
    f = jax.jit(run)
    want = f(kwargs)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    sharded = dict(kwargs, q=jax.device_put(kwargs["q"], NamedSharding(mesh, P("data", None, "model"))),
                   indices=jax.device_put(kwargs["indices"], NamedSharding(mesh, P("data"))))
    for a, b in zip(f(sharded), want):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# ---- the CUDA lowering's split workspace ---------------------------------------------------------------

def test_workspace_splits_bound():
    """The splits the CUDA handler may use (ops/sparse_decode.workspace_splits) on FlashMLA's decode
    shapes, and the workspace bound the op documents (S * b * s_q * h_q * 2052 bytes, at most
    17,335,296) over a sweep of shapes."""
    from jax_flashmla.ops.sparse_decode import workspace_splits

    # b, s_q, h_q, topk, extra topk -> S (0: no workspace)
    table = [((64, 1, 64, 2048, 0), 2), ((64, 1, 16, 2048, 0), 2), ((64, 1, 128, 2048, 0), 0),
             ((128, 1, 64, 2048, 0), 0), ((64, 2, 64, 2048, 0), 0), ((1, 1, 128, 2048, 0), 8),
             ((1, 1, 16, 16384, 0), 64), ((64, 1, 64, 128, 512), 2), ((2, 1, 8, 64, 0), 0),
             ((4, 1, 64, 100, 37), 0), ((0, 1, 64, 2048, 0), 0)]
    for shape, want in table:
        assert workspace_splits(*shape) == want, shape
    assert workspace_splits(64, 2, 64, 2048, 0, forced=5) == 5
    assert workspace_splits(1, 1, 8, 64, 0, forced=40) == 40  # more splits than blocks: a test hook
    assert workspace_splits(1, 1, 8, 2048, 0, forced=1) == 0
    worst = 0
    for b in range(1, 140):
        for s_q in (1, 2, 3):
            for h_q in (1, 16, 64, 65, 128):
                for topk, extra in ((64, 0), (512, 0), (2048, 0), (16384, 0), (128, 1024)):
                    splits = workspace_splits(b, s_q, h_q, topk, extra)
                    assert splits == 0 or splits * b * s_q * -(-h_q // 64) <= 132
                    worst = max(worst, splits * b * s_q * h_q * (512 + 1) * 4)
    assert 0 < worst <= 132 * 64 * 2052 == 17_335_296


def _cuda_custom_call(monkeypatch, kwargs):
    """The sparse decode custom call of `run` lowered for CUDA as on an SM90 GPU (no GPU needed)."""
    from jax_flashmla import _platform

    monkeypatch.setattr(_platform, "kernel_path", lambda platform=None: _platform.SM90_PATH)
    jax.clear_caches()
    try:
        text = jax.jit(run).trace(kwargs).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        jax.clear_caches()
    calls = [line for line in text.splitlines() if "custom_call @jax_flashmla_sparse_decode" in line]
    assert len(calls) == 1, calls
    return calls[0]


@pytest.mark.parametrize("forced,batch,want_splits,want_attr", [
    (None, 2, 8, 0),   # S = min(132 // 2, 2048 // 64 // 4) = 8, the handler choosing
    (None, 128, 0, 0),  # a full grid: no workspace (empty buffers)
    ("3", 128, 3, 3),   # the test hook: exactly 3 splits, the workspace sized for them
    ("1", 2, 0, 1),     # the direct path forced
])
def test_cuda_lowering_carries_the_workspace(rng, monkeypatch, forced, batch, want_splits, want_attr):
    """The CUDA custom call has out, lse and the split workspace (o_accum [S, b, s_q, h_q, 512], lse_accum
    [S, b, s_q, h_q], or both [0]) as results, and num_splits from JAX_FLASHMLA_SPARSE_SPLITS."""
    kwargs = make_case(rng, "v32", batch=batch, seqlen_q=1, heads=64, page=64, topk=2048, invalid=0.0)
    if forced is None:
        monkeypatch.delenv("JAX_FLASHMLA_SPARSE_SPLITS", raising=False)
    else:
        monkeypatch.setenv("JAX_FLASHMLA_SPARSE_SPLITS", forced)
    call = _cuda_custom_call(monkeypatch, kwargs)
    assert f"num_splits = {want_attr} : i32" in call
    results = call.rsplit("-> (", 1)[1]
    workspace = ((f"tensor<{want_splits}x{batch}x1x64x512xf32>", f"tensor<{want_splits}x{batch}x1x64xf32>")
                 if want_splits else ("tensor<0xf32>", "tensor<0xf32>"))
    assert results == (f"tensor<{batch}x1x64x512xbf16>, tensor<{batch}x64x1xf32>, "
                       f"{workspace[0]}, {workspace[1]})"), results


@pytest.mark.parametrize("value", ["-2", "two"])
def test_bad_split_switch_is_an_error(rng, monkeypatch, value):
    kwargs = make_case(rng, "v32", batch=2, seqlen_q=1, heads=8, page=64, topk=64, invalid=0.0)
    monkeypatch.setenv("JAX_FLASHMLA_SPARSE_SPLITS", value)
    with pytest.raises(ValueError, match="JAX_FLASHMLA_SPARSE_SPLITS"):
        _cuda_custom_call(monkeypatch, kwargs)
