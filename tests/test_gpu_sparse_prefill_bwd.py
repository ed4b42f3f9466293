"""The SM90 sparse prefill backward kernel (csrc/cuda/sparse_prefill_bwd/) against the pure-JAX backward.

Runs only where sparse prefill lowers to the CUDA kernels (`jax_flashmla.kernel_path() == "cuda-sm90"`);
skipped everywhere else. Setting JAX_FLASHMLA_GPU_TESTS_ON_CPU=1 runs it on the CPU instead (where the
backward is the pure-JAX program), to check the test code itself.

The kernel is opt-in (JAX_FLASHMLA_SPARSE_PREFILL_BWD_KERNEL=1, ops/sparse_prefill.py): every test
here sets it (tests/test_sparse_prefill.py checks, without a GPU, where the gradient lowers with and
without it).

Gradients are those of a loss on out and lse (jax.vjp with cotangents d_out and d_lse; max_logits
unused, so the custom VJP's backward primitive runs), taken wrt q, kv and attn_sink, and compared:
  - with the pure-JAX backward given the same forward results (the out and lse of this platform's
    forward), so that both use the same D and d_sink and differ only by the backward's own rounding;
  - with jax.vjp of the float32 reference at the same (bfloat16-valued) inputs.
Tolerances against the fallback (GRAD_TOL), per tensor scaled to unit max: within 3e-3 absolute or
3.01/128 relative, and a cosine difference under 2e-5; against the reference REF_TOL (see there). The
kernel's inputs are bfloat16 and it accumulates in float32, but it rounds dS and sig * P to bfloat16
before the dQ and dK products (relative 2^-9 a term) and dq to bfloat16 at the end (up to 3.9e-3 of an
element); D = sum(d_out * out) comes from the bfloat16 out, as in flash attention, moving small
elements by about 1e-3 of the largest (against the reference, not between the two backwards, which
share it); dkv is summed with atomics, in no fixed order (float32 rounding only). Cases: h_q 1/16/64/128, d_qk 576 and 512, topk 64, not a multiple of 64 and 2048, topk_length,
sinks (+-inf included), a nonzero d_lse, invalid ids anywhere, duplicate ids in a row and across
tokens, tokens with no valid entry (zero gradients), NaN in q and in a read kv row (propagates as in
the pure-JAX backward), NaN in unread kv rows (make_case fills every one: never leaks; their dkv is
exactly 0), and the batched form.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as fm
from jax_flashmla import reference
from jax_flashmla.ops import sparse_prefill, sparse_prefill_bwd
from prefill_cases import INVALID_IDS, SCALE, make_case
from sparse_cases import assert_close

_ON_CPU = os.environ.get("JAX_FLASHMLA_GPU_TESTS_ON_CPU") == "1"
EXPECTED_PATH = "cpu-ffi" if _ON_CPU else "cuda-sm90"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(fm.kernel_path() != EXPECTED_PATH,
                       reason=f"sparse prefill lowers to {fm.kernel_path()!r}, not the SM90 kernels "
                              "(needs an SM90 GPU, JAX's CUDA plugin and a CUDA build)"),
]

GRAD_TOL = dict(atol=3e-3, rtol=3.01 / 128, cos_tol=2e-5)
# Against the float32 reference, every gradient: D and d_sink's per-token term come from the bfloat16
# out (sum(d_out * out) over 512 channels of either sign, each rounded by up to 2^-9), an error that
# does not shrink with D when the terms cancel, and that every dS of the row carries into dq and dkv
# (dq = sum_t dS_t k_t, so with topk 2048 it reaches about 5e-3 of dq's largest element whichever
# backward runs). The kernel and the pure-JAX backward, given the same out and lse, share that D
# (row_factors), so between them GRAD_TOL. d_sink is not computed by the kernel at all (row_factors,
# in JAX, from the forward's out and lse): against the reference it is held to the bound that the
# bfloat16 out alone allows (d_sink_rounding_bound), and between the two backwards to GRAD_TOL.
REF_TOL = dict(atol=1e-2, rtol=3.01 / 128, cos_tol=1e-4)
NAMES = ("dq", "dkv", "d_sink")


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def _grads(q, kv, indices, topk_length, attn_sink, d_out, d_lse, sm_scale):
    def loss_parts(q, kv, attn_sink):
        out, _, lse = fm.flash_mla_sparse_fwd(q, kv, indices, sm_scale, attn_sink=attn_sink, topk_length=topk_length)
        return out, lse

    _, pullback = jax.vjp(loss_parts, q, kv, attn_sink)
    return pullback((d_out, d_lse))


def grads(case, d_out, d_lse, sm_scale=SCALE):
    """(dq, dkv, d_sink) of the op (d_sink None without a sink)."""
    return _grads(case["q"], case["kv"], case["indices"], case["topk_length"], case["attn_sink"], d_out, d_lse,
                  sm_scale=sm_scale)


@pytest.fixture(autouse=True)
def _kernel_opted_in(monkeypatch):
    monkeypatch.setenv(sparse_prefill.BWD_KERNEL_ENV, "1")


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def _forward(q, kv, indices, topk_length, attn_sink, sm_scale):
    out, _, lse = fm.flash_mla_sparse_fwd(q, kv, indices, sm_scale, attn_sink=attn_sink, topk_length=topk_length)
    return out, lse


def _pure_backward(q, kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse, sm_scale):
    """(dq, dkv, d_sink) of the pure-JAX backward program of one unbatched call (d_sink None without
    a sink)."""
    absent_length, absent_sink = sparse_prefill.absent_operands()
    dq, dkv, d_sink = sparse_prefill.backward_math(
        q, kv, indices, absent_length if topk_length is None else topk_length,
        absent_sink if attn_sink is None else attn_sink, out, lse, d_out, d_lse, sm_scale=sm_scale,
        d_v=fm.HEAD_DIM_V, chunk_bytes=sparse_prefill_bwd.CHUNK_BYTES)
    return dq, dkv, None if attn_sink is None else d_sink


def fallback_grads(case, d_out, d_lse, sm_scale=SCALE):
    """The pure-JAX backward (what the op's backward lowers to without the kernel) at the out and lse
    of this platform's forward, the residuals the kernel's backward gets. A batched case runs member
    by member on its share of the batched forward's results; a shared sink's d_sink is their sum."""
    c = case
    out, lse = _forward(c["q"], c["kv"], c["indices"], c["topk_length"], c["attn_sink"], sm_scale=sm_scale)
    if c["q"].ndim == 3:
        return _pure_backward(c["q"], c["kv"], c["indices"], c["topk_length"], c["attn_sink"], out, lse, d_out,
                              d_lse, sm_scale)
    parts = [_pure_backward(c["q"][i], c["kv"][i], c["indices"][i],
                            None if c["topk_length"] is None else c["topk_length"][i], c["attn_sink"], out[i],
                            lse[i], d_out[i], d_lse[i], sm_scale) for i in range(c["q"].shape[0])]
    dq, dkv, d_sink = zip(*parts)
    return jnp.stack(dq), jnp.stack(dkv), None if c["attn_sink"] is None else sum(d_sink)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def _reference_grads(q, kv, indices, topk_length, attn_sink, d_out, d_lse, sm_scale):
    def loss_parts(q, kv, attn_sink):
        out, _, lse = reference.sparse_prefill_reference_math(q, kv, indices, topk_length, attn_sink,
                                                              sm_scale=sm_scale)
        return out, lse

    f32 = jnp.float32
    _, pullback = jax.vjp(loss_parts, q.astype(f32), kv.astype(f32), attn_sink)
    return pullback((d_out.astype(f32), d_lse))


def reference_grads(case, d_out, d_lse, sm_scale=SCALE):
    return _reference_grads(case["q"], case["kv"], case["indices"], case["topk_length"], case["attn_sink"], d_out,
                            d_lse, sm_scale=sm_scale)


def cotangents(rng, case, with_d_lse=True):
    s_q, h_q, _ = case["q"].shape
    d_out = jnp.asarray(rng.standard_normal((s_q, h_q, 512)), jnp.bfloat16)
    d_lse = rng.standard_normal((s_q, h_q)) if with_d_lse else np.zeros((s_q, h_q))
    return d_out, jnp.asarray(d_lse, jnp.float32)


def _f32(x):
    return np.asarray(x, np.float32)


def assert_grads_close(got, want, *, nan_ok=False, tol=GRAD_TOL):
    """Each gradient within `tol` of the wanted one, scaled by the wanted one's largest finite element;
    NaN at the same places (assert_close). NaN in the kernel's results only where nan_ok."""
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            assert g is None, name
            continue
        g, w = _f32(g), _f32(w)
        finite = np.isfinite(w)
        scale = np.abs(w[finite]).max() if finite.any() else 1.0
        scale = scale if scale > 0 else 1.0
        assert_close(name, g / scale, w / scale, **tol)
        if not nan_ok:
            assert not np.isnan(g).any(), name


def d_sink_rounding_bound(case, d_out, sm_scale=SCALE):
    """How far d_sink may lie from the float32 reference's through the bfloat16 out alone, per head:
    d_sink = -sum_t (1 - sig_t) sum_v(d_out * out) (sparse_prefill_bwd.row_factors, summed over the
    tokens of every batch member), and each out element is within 2^-8 of its exact value (2^-9 for
    the rounding to bfloat16, as much again for the forward's float32 sums), so |d_sink - exact| <=
    sum_t (1 - sig_t) 2^-8 sum_v |d_out * out|."""
    c = case
    out, lse = _forward(c["q"], c["kv"], c["indices"], c["topk_length"], c["attn_sink"], sm_scale=sm_scale)
    sig = _f32(jax.nn.sigmoid(jnp.asarray(lse, jnp.float32) - jnp.asarray(c["attn_sink"], jnp.float32)))
    spread = np.sum(np.abs(_f32(d_out) * _f32(out)), axis=-1) * 2.0 ** -8
    per_head = np.where(np.isfinite(sig), (1.0 - sig) * spread, 0.0)
    return per_head.reshape(-1, per_head.shape[-1]).sum(axis=0)


def check(rng, case, *, with_d_lse=True):
    """The op's gradients against the forced fallback and the float32 reference; returns them."""
    d_out, d_lse = cotangents(rng, case, with_d_lse)
    got = jax.block_until_ready(grads(case, d_out, d_lse))
    assert got[0].shape == case["q"].shape and got[0].dtype == jnp.bfloat16
    assert got[1].shape == case["kv"].shape and got[1].dtype == jnp.bfloat16
    assert_grads_close(got, fallback_grads(case, d_out, d_lse))
    want = reference_grads(case, d_out, d_lse)
    assert_grads_close(got[:2], want[:2], tol=REF_TOL)
    if case["attn_sink"] is not None:
        g, w = _f32(got[2]), _f32(want[2])
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg="d_sink: NaN at different places")
        finite = np.isfinite(w)
        excess = np.abs(g - w)[finite] - d_sink_rounding_bound(case, d_out)[finite]
        assert not (excess > 1e-6).any(), f"d_sink: beyond the bfloat16-out bound by up to {excess.max():.3g}"
    # NaN fills every kv row no valid entry reads: their dkv is exactly 0.
    kv = _f32(case["kv"])[:, 0]
    unread = np.isnan(kv).any(axis=-1)
    assert np.all(_f32(got[1])[unread] == 0)
    return got


# ---- shapes ----------------------------------------------------------------------------------------

# (d_qk, h_q, s_q, s_kv, topk, sink, topk_length, empty rows)
CASES = [
    (576, 128, 9, 8192, 2048, True, True, 1),      # V3.2's shape, scaled down in s_q
    (512, 128, 7, 4096, 2048, False, False, 0),
    (576, 64, 13, 1000, 64, True, False, 0),       # one block a token
    (512, 16, 21, 900, 130, True, True, 2),        # topk not a multiple of 64
    (576, 1, 17, 300, 200, True, True, 1),
    (512, 3, 11, 9, 256, True, True, 0),           # almost every entry invalid
    (576, 100, 5, 600, 333, False, True, 0),       # four head tiles, the last of 4 heads
]


def _case_id(c):
    return "d{}-h{}-sq{}-skv{}-topk{}{}{}{}".format(*c[:5], "-sink" if c[5] else "", "-len" if c[6] else "",
                                                    f"-empty{c[7]}" if c[7] else "")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_fallback_and_reference(rng, case):
    d_qk, h_q, s_q, s_kv, topk, sink, lengths, empty_rows = case
    kwargs = make_case(rng, s_q=s_q, s_kv=s_kv, topk=topk, h_q=h_q, d_qk=d_qk, sink=sink, lengths=lengths,
                       empty_rows=empty_rows)
    check(rng, kwargs)


@pytest.mark.parametrize("d_qk", [576, 512])
@pytest.mark.parametrize("h_q", [1, 16, 64, 128])
def test_head_counts(rng, d_qk, h_q):
    kwargs = make_case(rng, s_q=6, s_kv=500, topk=100, h_q=h_q, d_qk=d_qk, sink=True, lengths=True, empty_rows=1)
    check(rng, kwargs)


@pytest.mark.parametrize("topk", [64, 65, 191, 2048])
def test_topk(rng, topk):
    kwargs = make_case(rng, s_q=5, s_kv=3000, topk=topk, h_q=32, d_qk=576, lengths=True)
    check(rng, kwargs, with_d_lse=False)


# ---- entries that must not be read, and repeated ones ------------------------------------------------

@pytest.mark.parametrize("d_qk", [576, 512])
def test_invalid_ids_anywhere(rng, d_qk):
    """Invalid ids scattered over the rows before topk_length: the gradients of the call with -1 there
    (dq bit for bit: its sums run in a fixed order; dkv within float32 rounding of the atomics' order)."""
    s_q, s_kv, topk = 9, 500, 200
    kwargs = make_case(rng, s_q=s_q, s_kv=s_kv, topk=topk, h_q=20, d_qk=d_qk, sink=True, lengths=True)
    ids = np.array(kwargs["indices"])
    garbage = np.array(INVALID_IDS + (s_kv, s_kv + 1), np.int64)
    pick = rng.random(ids.shape) < 0.3
    ids = np.where(pick, garbage[rng.integers(0, len(garbage), ids.shape)], ids).astype(np.int32)
    kwargs["indices"] = jnp.asarray(ids)
    got = check(rng, kwargs)
    masked = dict(kwargs, indices=jnp.asarray(np.where((ids < 0) | (ids >= s_kv), -1, ids).astype(np.int32)))
    d_out, d_lse = cotangents(np.random.default_rng(1), kwargs)
    got = grads(kwargs, d_out, d_lse)
    want = grads(masked, d_out, d_lse)
    np.testing.assert_array_equal(_f32(got[0]), _f32(want[0]))
    # One bfloat16 ulp (2^-7 relative at most) where the float32 sums, in another order, round across.
    want_dkv = _f32(want[1])
    np.testing.assert_allclose(_f32(got[1]), want_dkv, rtol=2 ** -7, atol=1e-3 * np.abs(want_dkv).max())
    np.testing.assert_array_equal(_f32(got[2]), _f32(want[2]))


def test_duplicate_ids_in_a_row_and_across_tokens(rng):
    """A row naming one kv row several times counts it once per entry; tokens sharing rows add into
    the same dkv rows (the atomics' concurrent case)."""
    s_q, s_kv, topk, h_q = 12, 40, 160, 64
    ids = rng.integers(0, s_kv, (s_q, 1, topk)).astype(np.int32)  # about 4 copies of each row per token
    ids[0, 0, :100] = 7  # one row named 100 times
    kwargs = make_case(rng, s_q=s_q, s_kv=s_kv, topk=topk, h_q=h_q, d_qk=576, sink=True, lengths=True)
    kwargs["indices"] = jnp.asarray(ids)
    kwargs["kv"] = jnp.asarray(rng.standard_normal((s_kv, 1, 576)) / 10, jnp.bfloat16)  # every row read
    check(rng, kwargs)


@pytest.mark.parametrize("h_q", [1, 16, 128])
def test_tokens_with_no_valid_entry_get_zero_gradients(rng, h_q):
    kwargs = make_case(rng, s_q=8, s_kv=300, topk=128, h_q=h_q, d_qk=512, sink=True, lengths=True)
    ids = np.array(kwargs["indices"])
    ids[3] = -1
    ids[6] = np.array(INVALID_IDS)[rng.integers(0, len(INVALID_IDS), ids[6].shape)]
    kwargs["indices"] = jnp.asarray(ids)
    dq = _f32(check(rng, kwargs)[0])
    for t in (0, 3, 6):  # make_case gives token 0 topk_length 0
        assert np.all(dq[t] == 0), t


# ---- NaN -------------------------------------------------------------------------------------------

def test_nan_in_q_propagates(rng):
    """NaN in one (token, head) of q: NaN in that row of dq and in the dkv rows the token reads, as in
    the pure-JAX backward; every other gradient stays finite."""
    kwargs = make_case(rng, s_q=5, s_kv=400, topk=192, h_q=20, d_qk=576)
    q = _f32(kwargs["q"])
    q[3, 17, 300] = np.nan
    kwargs["q"] = jnp.asarray(q, jnp.bfloat16)
    d_out, d_lse = cotangents(rng, kwargs)
    got = grads(kwargs, d_out, d_lse)
    assert_grads_close(got, fallback_grads(kwargs, d_out, d_lse), nan_ok=True)
    dq, dkv = _f32(got[0]), _f32(got[1])
    assert np.isnan(dq[3, 17]).all()
    dq[3, 17] = 0
    assert np.isfinite(dq).all()
    ids = np.array(kwargs["indices"])[3, 0]
    read = np.zeros(400, bool)
    read[ids[(ids >= 0) & (ids < 400)]] = True
    assert np.isnan(dkv[read]).any(axis=-1).all() and not np.isnan(dkv[~read]).any()


def test_nan_in_a_read_kv_row_reaches_its_readers(rng):
    """NaN in one channel of a kv row that some tokens read: NaN in those tokens' dq and in that row's
    dkv, as in the pure-JAX backward; tokens that do not read it keep finite dq."""
    kwargs = make_case(rng, s_q=10, s_kv=300, topk=128, h_q=16, d_qk=512, lengths=True)
    ids = np.array(kwargs["indices"])[:, 0]
    lengths = np.array(kwargs["topk_length"])
    read = (ids >= 0) & (ids < 300) & (np.arange(128)[None, :] < lengths[:, None])
    row = ids[-1][read[-1]][0]
    kv = _f32(kwargs["kv"])
    kv[row, 0, 7] = np.nan
    kwargs["kv"] = jnp.asarray(kv, jnp.bfloat16)
    d_out, d_lse = cotangents(rng, kwargs)
    got = grads(kwargs, d_out, d_lse)
    assert_grads_close(got, fallback_grads(kwargs, d_out, d_lse), nan_ok=True)
    readers = (read & (ids == row)).any(axis=1)
    dq, dkv = _f32(got[0]), _f32(got[1])
    assert readers[-1] and np.isnan(dkv[row]).any()
    for t in range(10):
        assert np.isnan(dq[t]).all() if readers[t] else np.isfinite(dq[t]).all(), t


# ---- the batched form ------------------------------------------------------------------------------

def test_batched_form(rng):
    """vmap's fold (B * s_q tokens, the members' kv concatenated, a shared sink taken out of the call)
    reaches the kernel too: against the fallback of the same batched call."""
    b, s_q, s_kv, topk, h_q = 2, 6, 500, 160, 32
    members = [make_case(rng, s_q=s_q, s_kv=s_kv, topk=topk, h_q=h_q, d_qk=576, lengths=True) for _ in range(b)]
    stack = lambda name: jnp.stack([m[name] for m in members])  # noqa: E731
    batched = dict(q=stack("q"), kv=stack("kv"), indices=stack("indices"), topk_length=stack("topk_length"),
                   attn_sink=jnp.asarray(np.linspace(-2, 2, h_q), jnp.float32))
    d_out = jnp.asarray(rng.standard_normal((b, s_q, h_q, 512)), jnp.bfloat16)
    d_lse = jnp.asarray(rng.standard_normal((b, s_q, h_q)), jnp.float32)
    got = grads(batched, d_out, d_lse)
    assert got[0].shape == batched["q"].shape and got[1].shape == batched["kv"].shape
    assert_grads_close(got, fallback_grads(batched, d_out, d_lse))
