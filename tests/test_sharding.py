"""jit with named shardings on a device mesh: the decode is partitioned, not gathered.

On the CPU, tests/conftest.py asks XLA for 8 host devices, so every test runs. On GPUs each test
takes the devices its mesh needs and is skipped when there are fewer (a 2-GPU machine runs the
1-D meshes of 2)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_flashmla as fm
from jax_flashmla import _ffi
from mla_cases import assert_within_eps, gspmd_partitioner, make_case, mesh_of


def place(mesh, arrays, specs):
    return [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(arrays, specs)]


def decode_fn(causal, with_plan=False, rows=None, h_kv=None):
    def fn(q, k, bt, sl):
        kw = {}
        if with_plan:
            kw = dict(zip(("tile_md", "num_splits"), fm.get_mla_metadata(sl, rows, h_kv)))
        return fm.flash_mla_with_kvcache(q, k, bt, sl, causal=causal, **kw)
    return jax.jit(fn)


def check(fn, mesh, case, specs, causal, *, gathers_allowed=True):
    """Runs fn on the placed case, compares with the reference; returns (out, lse, compiled HLO)."""
    args = place(mesh, case, specs)
    hlo = fn.lower(*args).compile().as_text()
    out, lse = fn(*args)
    ref_out, ref_lse = fm.mla_decode_reference(*case, causal=causal)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=2e-2, rtol=2e-2,
                               equal_nan=False)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5, atol=1e-5, equal_nan=False)
    if not gathers_allowed:
        assert "all-gather" not in hlo, re.findall(r"all-gather[^\n]*", hlo)[:3]
    return out, lse, hlo


def local_out_shapes(hlo):
    """Shapes of `out` of every decode custom call in the compiled module: what one device computes."""
    calls = [line for line in hlo.splitlines() if f'custom_call_target="{_ffi.DECODE_TARGET}"' in line]
    assert calls, "no decode custom call in the compiled module"
    return [tuple(int(d) for d in re.search(r"= \((?:bf16|f16)\[([\d,]+)\]", line).group(1).split(","))
            for line in calls]


@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("with_plan", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_data_parallel_rebases_page_ids(causal, with_plan, shards):
    mesh = mesh_of((shards,), ("x",))
    case = make_case(40, batch=2 * shards, seqlen_q=2, heads_q=4, shards=shards)
    fn = decode_fn(causal, with_plan, rows=8, h_kv=1)
    out, lse, hlo = check(fn, mesh, case, (P("x"),) * 4, causal, gathers_allowed=False)
    assert out.sharding.spec[0] == "x" and lse.sharding.spec[0] == "x"
    assert local_out_shapes(hlo) == [(2, 2, 4, fm.HEAD_DIM_V)]


@pytest.mark.parametrize("shards", [2, 4])
def test_data_parallel_with_replicated_cache_uses_global_ids(shards):
    mesh = mesh_of((shards,), ("x",))
    case = make_case(41, batch=2 * shards, heads_q=2)  # pages anywhere in the pool
    _, _, hlo = check(decode_fn(False), mesh, case, (P("x"), P(), P("x"), P("x")), False, gathers_allowed=False)
    assert local_out_shapes(hlo) == [(2, 1, 2, fm.HEAD_DIM_V)]


def test_data_parallel_page_outside_own_shard_is_an_error_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU path checks page ids; the GPU kernel reads ids outside the pool as zeros")
    mesh = mesh_of((2,), ("x",))
    q, k, bt, sl = make_case(42, batch=4, heads_q=2, lens=[100, 100, 100, 100], shards=2)
    bt = bt.at[0, 0].set(bt[3, 0])  # request 0 (shard 0) reads a page of shard 1
    with pytest.raises(Exception, match="outside the pool"):
        jax.block_until_ready(decode_fn(False)(*place(mesh, (q, k, bt, sl), (P("x"),) * 4)))


@pytest.mark.parametrize("h_kv", [1, 2])
def test_head_parallel(h_kv):
    mesh = mesh_of((2,), ("h",))
    case = make_case(43, batch=2, seqlen_q=2, heads_q=4, heads_k=h_kv)
    specs = (P(None, None, "h"), P(), P(), P())
    out, lse, hlo = check(decode_fn(True, True, rows=8 // h_kv, h_kv=h_kv), mesh, case, specs, True,
                          gathers_allowed=False)
    assert out.sharding.spec[2] == "h" and lse.sharding.spec[1] == "h"
    assert local_out_shapes(hlo) == [(2, 2, 2, fm.HEAD_DIM_V)]


def test_data_and_head_parallel_on_2d_mesh():
    mesh = mesh_of((2, 4), ("x", "h"))
    case = make_case(44, batch=4, seqlen_q=1, heads_q=8, heads_k=1, shards=2)
    specs = (P("x", None, "h"), P("x"), P("x"), P("x"))
    out, lse, hlo = check(decode_fn(False), mesh, case, specs, False, gathers_allowed=False)
    assert tuple(out.sharding.spec)[:3] == ("x", None, "h") and tuple(lse.sharding.spec)[:2] == ("x", "h")
    assert local_out_shapes(hlo) == [(2, 1, 2, fm.HEAD_DIM_V)]


def test_batch_over_two_mesh_axes():
    mesh = mesh_of((2, 2), ("a", "b"))
    case = make_case(45, batch=8, heads_q=2, shards=4)
    _, _, hlo = check(decode_fn(True), mesh, case, (P(("a", "b")),) * 4, True, gathers_allowed=False)
    assert local_out_shapes(hlo) == [(2, 1, 2, fm.HEAD_DIM_V)]


FALLBACKS = {
    # name: (mesh shape, axis names, case kwargs, specs)
    "q_on_seqlen": ((2,), ("x",), dict(batch=2, seqlen_q=2, heads_q=2), (P(None, "x"), P(), P(), P())),
    "cache_on_channels": ((2,), ("x",), dict(batch=2, heads_q=2), (P(), P(None, None, None, "x"), P(), P())),
    "cache_on_blocks_q_replicated": ((2,), ("x",), dict(batch=2, heads_q=2, num_blocks=8), (P(), P("x"), P(), P())),
    "cache_blocks_on_other_axis": ((2, 2), ("x", "y"), dict(batch=4, heads_q=2, shards=2),
                                   (P("x"), P("y"), P("x"), P("x"))),
    "kv_heads_not_divisible": ((4,), ("h",), dict(batch=2, heads_q=4, heads_k=2), (P(None, None, "h"), P(), P(), P())),
    "cache_on_page_slots": ((2,), ("x",), dict(batch=2, heads_q=2), (P(), P(None, "x"), P(), P())),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_other_shardings_fall_back_to_a_correct_plan(name):
    shape, names, kw, specs = FALLBACKS[name]
    check(decode_fn(True), mesh_of(shape, names), make_case(46, **kw), specs, True)


def test_gspmd_callbacks():
    with gspmd_partitioner():
        mesh = mesh_of((2, 2), ("x", "h"))
        case = make_case(47, batch=4, seqlen_q=2, heads_q=4, shards=2)
        specs = (P("x", None, "h"), P("x"), P("x"), P("x"))
        _, _, hlo = check(decode_fn(True), mesh, case, specs, True, gathers_allowed=False)
        assert local_out_shapes(hlo) == [(2, 2, 2, fm.HEAD_DIM_V)]


def test_grad_under_data_parallel_sharding():
    mesh = mesh_of((2,), ("x",))
    q, k, bt, sl = make_case(48, batch=4, seqlen_q=2, heads_q=2, shards=2)
    loss = lambda fn: (lambda q, k: jnp.sum(fn(q, k)[0].astype(jnp.float32) ** 2))
    grad = jax.jit(jax.grad(loss(lambda q, k: fm.flash_mla_with_kvcache(q, k, bt, sl, causal=True)), (0, 1)))
    got = grad(*place(mesh, (q, k), (P("x"), P("x"))))
    want = jax.grad(loss(lambda q, k: fm.mla_decode_reference(q, k, bt, sl, causal=True)), (0, 1))(q, k)
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.nan_to_num(np.asarray(w, np.float32))
        assert np.abs(g - w).max() <= 2e-2 * np.abs(w).max()


def test_hessian_vector_product_under_data_parallel_sharding():
    # Second derivatives are right under named shardings; their JVP rules are plain JAX, which XLA
    # partitions by gathering (docs/transformations.md, "grad"), so no collective count is asserted.
    mesh = mesh_of((2,), ("x",))
    q, k, bt, sl = make_case(49, batch=4, heads_q=4, lens=[1, 150, 64, 0], shards=2)
    rng = np.random.default_rng(50)
    vq = jnp.asarray(rng.standard_normal(q.shape), q.dtype)
    vk = jnp.asarray(rng.standard_normal(k.shape), k.dtype)

    def hvp(fn):
        loss = lambda q, k: jnp.sum(fn(q, k)[0].astype(jnp.float32) ** 2)
        return lambda q, k: jax.jvp(jax.grad(loss, (0, 1)), (q, k), (vq, vk))[1]

    got = jax.jit(hvp(lambda q, k: fm.flash_mla_with_kvcache(q, k, bt, sl)))(*place(mesh, (q, k), (P("x"), P("x"))))
    want = hvp(lambda q, k: fm.mla_decode_reference(q, k, bt, sl))(q, k)
    for g, w in zip(got, want):
        assert_within_eps(g, w, q.dtype, l2=2.5)


# ---- the backward: partitioned like the forward ---------------------------------------------------

def grad_fn(causal):
    """jit(grad) of a loss that weighs out and the finite part of lse (both cotangents reach the
    backward), with respect to q and k_cache."""
    def loss(q, k, bt, sl):
        out, lse = fm.flash_mla_with_kvcache(q, k, bt, sl, causal=causal)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * w) + 0.3 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
    return jax.jit(jax.grad(loss, (0, 1)))


def check_grad(mesh, case, specs, causal, *, gathers_allowed=True, reductions_allowed=True):
    """Sharded gradients against the unsharded ones of the same op; returns (dq, dk, compiled HLO)."""
    fn = grad_fn(causal)
    args = place(mesh, case, specs)
    hlo = fn.lower(*args).compile().as_text()
    got = fn(*args)
    want = fn(*case)
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(g).all()  # NaN in unused cache slots stays out
        # The same per-shard math; only sums over shards (psum of dk) may round differently.
        np.testing.assert_allclose(g, w, rtol=1e-2, atol=1e-2 * np.abs(w).max())
    if not gathers_allowed:
        assert "all-gather" not in hlo, re.findall(r"all-gather[^\n]*", hlo)[:3]
    if not reductions_allowed:
        assert "all-reduce" not in hlo, re.findall(r"all-reduce[^\n]*", hlo)[:3]
    return got[0], got[1], hlo


@pytest.mark.parametrize("shards", [2, 4])
@pytest.mark.parametrize("h_kv,s_q,causal", [(1, 1, False), (1, 2, True), (2, 3, True)])
def test_grad_data_parallel_needs_no_collective(shards, h_kv, s_q, causal):
    """Each shard's dk is its own slice of the pool and dq its own rows: no all-gather of the pool,
    no all-reduce either. The case: pages shuffled within each shard's slice, NaN past each length,
    garbage past ceil(len / 64), a zero length and a length-1 request (with causal s_q > 1 its
    first query rows see nothing)."""
    mesh = mesh_of((shards,), ("x",))
    batch = 2 * shards
    lens = np.random.default_rng(shards).integers(1, 3 * fm.PAGE_SIZE + 1, batch)
    lens[0], lens[-1] = 0, 1
    case = make_case(50 + shards, batch=batch, seqlen_q=s_q, heads_q=4, heads_k=h_kv, lens=lens, shards=shards)
    dq, dk, hlo = check_grad(mesh, case, (P("x"),) * 4, causal, gathers_allowed=False, reductions_allowed=False)
    assert dq.sharding.spec[0] == "x" and dk.sharding.spec[0] == "x"
    # Pages no request reads get zero; at least one page of every shard gets some gradient.
    n_local = case[1].shape[0] // shards
    dk = np.asarray(dk, np.float32).reshape(shards, n_local, -1)
    assert all(np.abs(dk[i]).max() > 0 for i in range(shards))


def test_grad_data_parallel_with_plan_and_foreign_page_ids_past_length():
    """A plan passed to the forward and garbage ids past a length (here: another shard's pages)."""
    mesh = mesh_of((2,), ("x",))
    q, k, bt, sl = make_case(53, batch=4, seqlen_q=2, heads_q=2, lens=[64, 65, 10, 129], shards=2)
    bt = bt.at[0, 1:].set(bt[3, 0])  # past request 0's single page: a page of shard 1
    def loss(q, k, bt, sl):
        tile_md, num_splits = fm.get_mla_metadata(sl, 4, 1)
        out, _ = fm.flash_mla_with_kvcache(q, k, bt, sl, tile_md=tile_md, num_splits=num_splits, causal=True)
        return jnp.sum(out.astype(jnp.float32) ** 2)
    fn = jax.jit(jax.grad(loss, (0, 1)))
    args = place(mesh, (q, k, bt, sl), (P("x"),) * 4)
    assert "all-gather" not in fn.lower(*args).compile().as_text()
    for g, w in zip(fn(*args), fn(q, k, bt, sl)):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("h_kv", [1, 2])
def test_grad_head_parallel(h_kv):
    # h_kv = 1: the replicated pool's dk sums the head shards' parts (an all-reduce, no gather);
    # h_kv = 2: the pool is split on its heads like q, so each shard's dk is its own.
    mesh = mesh_of((2,), ("h",))
    case = make_case(54, batch=2, seqlen_q=2, heads_q=4, heads_k=h_kv)
    specs = (P(None, None, "h"), P(None, None, "h") if h_kv > 1 else P(), P(), P())
    dq, _, _ = check_grad(mesh, case, specs, True, gathers_allowed=False, reductions_allowed=h_kv == 1)
    assert dq.sharding.spec[2] == "h"


def test_grad_data_and_head_parallel_on_2d_mesh():
    mesh = mesh_of((2, 4), ("x", "h"))
    case = make_case(55, batch=4, seqlen_q=2, heads_q=8, heads_k=1, shards=2)
    dq, dk, _ = check_grad(mesh, case, (P("x", None, "h"), P("x"), P("x"), P("x")), True, gathers_allowed=False)
    assert tuple(dq.sharding.spec)[:3] == ("x", None, "h") and dk.sharding.spec[0] == "x"


def test_grad_batch_over_two_mesh_axes():
    mesh = mesh_of((2, 2), ("a", "b"))
    case = make_case(56, batch=8, heads_q=2, shards=4)
    check_grad(mesh, case, (P(("a", "b")),) * 4, True, gathers_allowed=False, reductions_allowed=False)


@pytest.mark.parametrize("shards", [2, 4])
def test_grad_data_parallel_with_replicated_cache(shards):
    # Global ids, every shard may touch any page: dk is summed over the shards (all-reduce).
    mesh = mesh_of((shards,), ("x",))
    case = make_case(57, batch=2 * shards, heads_q=2)
    check_grad(mesh, case, (P("x"), P(), P("x"), P("x")), False, gathers_allowed=False)


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_grad_under_other_shardings_falls_back_to_a_correct_plan(name):
    shape, names, kw, specs = FALLBACKS[name]
    check_grad(mesh_of(shape, names), make_case(58, **kw), specs, True)


def test_grad_gspmd_callbacks():
    with gspmd_partitioner():
        mesh = mesh_of((2,), ("x",))
        case = make_case(59, batch=4, seqlen_q=2, heads_q=4, heads_k=2, shards=2)
        check_grad(mesh, case, (P("x"),) * 4, True, gathers_allowed=False, reductions_allowed=False)
