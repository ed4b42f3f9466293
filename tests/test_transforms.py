"""vmap, pmap, shard_map, jit with donation and checkpoint, each against the pure-JAX reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import jax_flashmla as fm
from jax_flashmla import _ffi
from mla_cases import devices_or_skip, make_case


def assert_matches(got, want):
    out, lse = got
    ref_out, ref_lse = want
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=2e-2, rtol=2e-2,
                               equal_nan=False)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5, atol=1e-5, equal_nan=False)


def _members(seed, count, **kw):
    cases = [make_case(seed + m, **kw) for m in range(count)]
    return [jnp.stack(parts) for parts in zip(*cases)]


# ---- vmap -------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_vmap_all_operands_mapped_one_pool_per_member(causal):
    qs, ks, bts, sls = _members(10, 3, batch=2, seqlen_q=2, heads_q=4, heads_k=2)
    got = jax.vmap(lambda *a: fm.flash_mla_with_kvcache(*a, causal=causal))(qs, ks, bts, sls)
    want = [fm.mla_decode_reference(qs[m], ks[m], bts[m], sls[m], causal=causal) for m in range(3)]
    assert_matches(got, [jnp.stack(w) for w in zip(*want)])


def test_vmap_shared_pool_and_other_in_axes():
    q, k, bt, sl = make_case(11, batch=3, heads_q=2)
    qs = jnp.stack([q, 2 * q], axis=1)  # mapped axis not leading
    sls = jnp.stack([sl, jnp.maximum(sl - 7, 0)])
    fn = jax.vmap(lambda q, sl: fm.flash_mla_with_kvcache(q, k, bt, sl), in_axes=(1, 0))
    got = fn(qs, sls)
    want = [fm.mla_decode_reference(qs[:, m], k, bt, sls[m]) for m in range(2)]
    assert_matches(got, [jnp.stack(w) for w in zip(*want)])


def test_vmap_only_cache_mapped():
    q, k, bt, sl = make_case(12, batch=2)
    ks = jnp.stack([k, -k, 0.25 * k + 1])  # NaN stays in the unused slots of every pool
    got = jax.vmap(lambda k: fm.flash_mla_with_kvcache(q, k, bt, sl))(ks)
    want = [fm.mla_decode_reference(q, ks[m], bt, sl) for m in range(3)]
    assert_matches(got, [jnp.stack(w) for w in zip(*want)])


def test_vmap_with_mapped_metadata_replans_the_folded_batch():
    qs, ks, bts, sls = _members(13, 2, batch=2, heads_q=4, lens=None)
    plans = jax.vmap(lambda s: fm.get_mla_metadata(s, 4, 1, num_sm_parts=3))(sls)
    assert plans[0].shape == (2, 3, 8) and plans[1].shape == (2, 3)
    for m in range(2):  # mapped metadata: one plan per member, as an unmapped call makes it
        single = fm.get_mla_metadata(sls[m], 4, 1, num_sm_parts=3)
        np.testing.assert_array_equal(plans[0][m], single[0])
        np.testing.assert_array_equal(plans[1][m], single[1])
    got = jax.vmap(lambda q, k, bt, sl, md, ns: fm.flash_mla_with_kvcache(q, k, bt, sl, tile_md=md, num_splits=ns))(
        qs, ks, bts, sls, *plans)
    want = [fm.mla_decode_reference(qs[m], ks[m], bts[m], sls[m]) for m in range(2)]
    assert_matches(got, [jnp.stack(w) for w in zip(*want)])


def test_nested_vmap():
    q, k, bt, sl = make_case(15, batch=2, heads_q=2)
    qs = jnp.stack([jnp.stack([q, -q]), jnp.stack([0.5 * q, q])])
    got = jax.vmap(jax.vmap(lambda q: fm.flash_mla_with_kvcache(q, k, bt, sl)))(qs)
    want = jax.vmap(jax.vmap(lambda q: fm.mla_decode_reference(q, k, bt, sl)))(qs)
    assert_matches(got, want)


# ---- pmap and shard_map ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 4])
def test_pmap_lowers_per_device(n):
    q, k, bt, sl = make_case(20, batch=n, seqlen_q=2, heads_q=4)
    fn = jax.pmap(lambda q, bt, sl: fm.flash_mla_with_kvcache(q, k, bt, sl, causal=True), devices=devices_or_skip(n))
    out, lse = fn(q[:, None], bt[:, None], sl[:, None])
    assert_matches((out[:, 0], lse[:, 0]), fm.mla_decode_reference(q, k, bt, sl, causal=True))
    hlo = fn.lower(q[:, None], bt[:, None], sl[:, None]).compile().as_text()
    assert _ffi.DECODE_TARGET in hlo


def test_grad_inside_pmap():
    # Each device differentiates its own requests against the shared pool: dq matches the
    # single-device gradient (the backward's per-device math is the same).
    q, k, bt, sl = make_case(23, batch=4, seqlen_q=2, heads_q=4)

    def loss(q, bt, sl):
        out, _ = fm.flash_mla_with_kvcache(q, k, bt, sl, causal=True)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    split = lambda x: x.reshape(2, 2, *x.shape[1:])
    got = jax.pmap(jax.grad(loss), devices=devices_or_skip(2))(split(q), split(bt), split(sl))
    want = jax.grad(loss)(q, bt, sl)
    np.testing.assert_allclose(np.asarray(got, np.float32).reshape(want.shape), np.asarray(want, np.float32),
                               rtol=1e-2, atol=1e-2 * float(np.abs(np.asarray(want, np.float32)).max()))


def _shard_map(fn, mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    from jax.experimental.shard_map import shard_map  # older JAX

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


@pytest.mark.parametrize("n", [2, 4])
def test_shard_map_data_parallel_with_local_pools(n):
    mesh = Mesh(np.array(devices_or_skip(n)), ("x",))
    q, k, bt, sl = make_case(21, batch=2 * n, seqlen_q=2, heads_q=4, shards=n)

    def local(q, k, bt, sl):
        bt = bt - jax.lax.axis_index("x") * k.shape[0]  # global page ids -> this device's pool
        return fm.flash_mla_with_kvcache(q, k, bt, sl, causal=True)

    fn = jax.jit(_shard_map(local, mesh, (P("x"),) * 4, (P("x"), P("x"))))
    assert_matches(fn(q, k, bt, sl), fm.mla_decode_reference(q, k, bt, sl, causal=True))
    hlo = fn.lower(q, k, bt, sl).compile().as_text()
    assert "all-gather" not in hlo and _ffi.DECODE_TARGET in hlo


def test_shard_map_head_parallel():
    mesh = Mesh(np.array(devices_or_skip(2)), ("h",))
    q, k, bt, sl = make_case(22, batch=2, heads_q=4, heads_k=2)
    fn = jax.jit(_shard_map(lambda q, k: fm.flash_mla_with_kvcache(q, k, bt, sl),
                            mesh, (P(None, None, "h"), P(None, None, "h")), (P(None, None, "h"), P(None, "h"))))
    assert_matches(fn(q, k), fm.mla_decode_reference(q, k, bt, sl))


def _loss(q, k, bt, sl, causal=True):
    out, lse = fm.flash_mla_with_kvcache(q, k, bt, sl, causal=causal)
    finite = jnp.isfinite(lse)  # rows with no visible key have lse = +inf
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(jnp.where(finite, lse, 0.0))


def _assert_grads_match(got, want):
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(g).all() and np.isfinite(w).all()
        np.testing.assert_allclose(g, w, rtol=1e-2, atol=1e-2 * float(np.abs(w).max()))


@pytest.mark.parametrize("n", [2, 4])
def test_grad_inside_shard_map_data_parallel_with_local_pools(n):
    # Each device differentiates its requests against its own slice of the pool: dq and dk equal the
    # single-device gradients, with no collective.
    mesh = Mesh(np.array(devices_or_skip(n)), ("x",))
    q, k, bt, sl = make_case(24, batch=2 * n, seqlen_q=2, heads_q=4, shards=n)

    def local(q, k, bt, sl):
        bt = bt - jax.lax.axis_index("x") * k.shape[0]
        return jax.grad(_loss, argnums=(0, 1))(q, k, bt, sl)

    fn = jax.jit(_shard_map(local, mesh, (P("x"),) * 4, (P("x"), P("x"))))
    _assert_grads_match(fn(q, k, bt, sl), jax.grad(_loss, argnums=(0, 1))(q, k, bt, sl))


def test_grad_inside_shard_map_replicated_pool_is_summed():
    # A pool every device holds whole while the batch is split: each device's dk covers only its
    # own requests, and the op's operands are cast to vary alike, whose transpose sums dk over "x".
    mesh = Mesh(np.array(devices_or_skip(2)), ("x",))
    q, k, bt, sl = make_case(25, batch=4, seqlen_q=3, heads_q=4, heads_k=2)

    def local(q, k, bt, sl):
        return jax.grad(_loss, argnums=(0, 1))(q, k, bt, sl)

    fn = jax.jit(_shard_map(local, mesh, (P("x"), P(), P("x"), P("x")), (P("x"), P())))
    _assert_grads_match(fn(q, k, bt, sl), jax.grad(_loss, argnums=(0, 1))(q, k, bt, sl))


def test_grad_inside_shard_map_head_parallel():
    mesh = Mesh(np.array(devices_or_skip(2)), ("h",))
    q, k, bt, sl = make_case(26, batch=2, seqlen_q=2, heads_q=6, heads_k=2, lens=[0, 150])
    grad = lambda q, k: jax.grad(_loss, argnums=(0, 1))(q, k, bt, sl)  # noqa: E731
    spec = P(None, None, "h")
    fn = jax.jit(_shard_map(grad, mesh, (spec, spec), (spec, spec)))
    _assert_grads_match(fn(q, k), grad(q, k))


def test_shard_map_results_vary_over_the_split_axis():
    # The op's results are typed per device inside shard_map, so shard_map's own check rejects an
    # out_spec that would claim them equal on every device (it would silently return one shard).
    mesh = Mesh(np.array(devices_or_skip(2)), ("x",))
    q, k, bt, sl = make_case(27, batch=4, heads_q=4, shards=2)

    def local(q, k, bt, sl):
        bt = bt - jax.lax.axis_index("x") * k.shape[0]
        return fm.flash_mla_with_kvcache(q, k, bt, sl)[0]

    with pytest.raises(Exception, match="(?i)replicat"):
        jax.jit(_shard_map(local, mesh, (P("x"),) * 4, P()))(q, k, bt, sl)


# ---- jit with donation, checkpoint ------------------------------------------------------------------

def test_jit_with_donated_cache_appends_then_decodes():
    q, k, bt, sl = make_case(30, batch=2, heads_q=2, lens=[10, 64], poison=False)
    new = jax.random.normal(jax.random.PRNGKey(0), (2, fm.HEAD_DIM), jnp.bfloat16)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(k_cache, new, sl):
        # Writes one token per request at position len, then attends over len + 1 tokens.
        page = jnp.take_along_axis(bt, (sl // fm.PAGE_SIZE)[:, None], axis=1)[:, 0]
        k_cache = k_cache.at[page, sl % fm.PAGE_SIZE, 0].set(new)
        out, lse = fm.flash_mla_with_kvcache(q, k_cache, bt, sl + 1)
        return k_cache, out, lse

    k_expected = np.asarray(k, np.float32)
    page = np.asarray(bt)[np.arange(2), np.asarray(sl) // fm.PAGE_SIZE]
    k_expected[page, np.asarray(sl) % fm.PAGE_SIZE, 0] = np.asarray(new, np.float32)
    k_expected = jnp.asarray(k_expected, jnp.bfloat16)
    k_new, out, lse = step(jnp.array(k), new, sl)
    assert_matches((out, lse), fm.mla_decode_reference(q, k_expected, bt, sl + 1))
    np.testing.assert_array_equal(np.asarray(k_new, np.float32), np.asarray(k_expected, np.float32))


def test_checkpoint_forward():
    q, k, bt, sl = make_case(31, batch=2, seqlen_q=2, heads_q=2)
    fn = jax.jit(jax.checkpoint(lambda q, k: fm.flash_mla_with_kvcache(q, k, bt, sl, causal=True)))
    assert_matches(fn(q, k), fm.mla_decode_reference(q, k, bt, sl, causal=True))


def _run_snippets(blocks, tmp_path):
    """Runs python blocks, in order, in a fresh process that imports the same jax_flashmla as this
    test (the installed or Bazel-built one, never the source folder, which has no compiled
    extension in a fresh checkout)."""
    import os
    import pathlib
    import subprocess
    import sys

    package_parent = pathlib.Path(fm.__file__).absolute().parents[1]  # not resolved: Bazel runfiles are links
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(package_parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", "\n".join(blocks) + "\nprint('snippets ok')"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "snippets ok" in done.stdout, done.stderr[-3000:]


def _python_blocks(text):
    import re

    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_docs_snippets_run(tmp_path):
    # docs/transformations.md promises runnable snippets.
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    blocks = _python_blocks((root / "docs" / "transformations.md").read_text())
    assert len(blocks) >= 5
    _run_snippets(blocks, tmp_path)


def test_readme_transformation_snippets_run(tmp_path):
    # So do the README's "JAX transformations" section (setup block first, then one per transformation).
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## JAX transformations", 1)[1].split("\n## ", 1)[0]
    blocks = _python_blocks(section)
    assert len(blocks) >= 7
    _run_snippets(blocks, tmp_path)
