"""The sparse decode (flash_mla_with_kvcache with indices) split over devices: inside shard_map, and
under jit with named shardings, where it is partitioned (head- and data-parallel, slot ids rebased)
instead of gathered. Every sharded result is compared with the unsharded call's, element for
element: each device runs the same CPU handler on its own requests and heads, so nothing may differ.

tests/conftest.py gives the CPU 8 host devices; with fewer devices a test is skipped."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_flashmla as fm
from jax_flashmla import _ffi, _partition, kv_formats
from mla_cases import devices_or_skip, gspmd_partitioner, mesh_of, place
from sparse_cases import INT32_MAX, INT32_MIN, assert_close, make_indices, make_lengths, make_sink

NAMES = ("q", "k_cache", "indices", "topk_length", "attn_sink", "extra_k_cache", "extra_indices_in_kvcache",
         "extra_topk_length")
POOLS = ("k_cache", "extra_k_cache")


# ---- problems ------------------------------------------------------------------------------------------

def pool_and_ids(rng, fmt, *, batch, seqlen_q, page, topk, blocks, shards, lengths):
    """(FP8 pool of `blocks` pages, ids [b, s_q, topk], topk_length or None). With the pool cut into
    `shards` slices of pages and the batch into `shards` slices of requests, every id a request reads
    (before its topk_length) is -1 or a slot of its own slice: the data-parallel rule. Past
    topk_length the ids are garbage (make_indices), other slices' slots included."""
    local_slots = blocks // shards * page
    lens = make_lengths(rng, batch, topk) if lengths else None
    ids = make_indices(rng, batch=batch, seqlen_q=seqlen_q, topk=topk, num_slots=local_slots, invalid=0.2,
                       topk_length=lens)
    shard_of_row = np.arange(batch) // (batch // shards)
    ids = np.where((ids >= 0) & (ids < local_slots), ids + (shard_of_row * local_slots)[:, None, None], ids)
    kv = np.clip(rng.standard_normal((blocks, page, 1, fmt.d_qk)) / 10, -1, 1)
    pool = kv_formats.quantize_kv_cache(jnp.asarray(kv, jnp.bfloat16), fmt)
    return pool, jnp.asarray(ids, jnp.int32), None if lens is None else jnp.asarray(lens)


def make_call(rng, fmt_name="v32", *, batch, heads, seqlen_q=1, shards=1, page=61, topk=64, blocks=4,
              lengths=True, sink=True, extra=(2, 32, 8)):
    """kwargs of a sparse flash_mla_with_kvcache; extra: (page, topk, blocks) of the extra pool, or None."""
    fmt = kv_formats.kv_cache_format(fmt_name)
    q = jnp.asarray(np.clip(rng.standard_normal((batch, seqlen_q, heads, fmt.d_qk)), -1, 1), jnp.bfloat16)
    pool, ids, lens = pool_and_ids(rng, fmt, batch=batch, seqlen_q=seqlen_q, page=page, topk=topk, blocks=blocks,
                                   shards=shards, lengths=lengths)
    call = dict(q=q, k_cache=pool, indices=ids, topk_length=lens,
                attn_sink=jnp.asarray(make_sink(rng, heads)) if sink else None)
    if extra is not None:
        e_page, e_topk, e_blocks = extra
        e_pool, e_ids, e_lens = pool_and_ids(rng, fmt, batch=batch, seqlen_q=seqlen_q, page=e_page, topk=e_topk,
                                             blocks=e_blocks, shards=shards, lengths=lengths)
        call.update(extra_k_cache=e_pool, extra_indices_in_kvcache=e_ids, extra_topk_length=e_lens)
    return call


def sparse(call):
    call = dict(call)
    return fm.flash_mla_with_kvcache(call.pop("q"), call.pop("k_cache"), None, None, is_fp8_kvcache=True, **call)


SPARSE = jax.jit(sparse)


def assert_same(got, want):
    for name, g, w in zip(("out", "lse"), got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=name)


def collectives(hlo):
    return re.findall(r"\b(?:all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter)\b[^\n]*", hlo)


def local_operand_shapes(hlo):
    """Per sparse custom call in the compiled module, the shapes of its eight operands: what one
    device holds."""
    calls = [line for line in hlo.splitlines() if f'custom_call_target="{_ffi.SPARSE_DECODE_TARGET}"' in line]
    assert calls, "no sparse decode custom call in the compiled module"
    shapes = []
    for line in calls:
        constraints = re.search(r"operand_layout_constraints=\{(.*?)\}, api_version", line).group(1)
        shapes.append([tuple(int(d) for d in dims.split(",") if d)
                       for dims in re.findall(r"\w+\[([\d,]*)\]\{", constraints)])
    return shapes


def check_partitioned(mesh, call, specs, *, local):
    """The call placed by `specs` gives the unsharded result, and its compiled module has no
    collective at all (no pool, length or sink is gathered) and one custom call whose operands have
    the shapes in `local` (name -> local shape; the others must be whole)."""
    want = SPARSE(call)
    args = place(mesh, call, specs)
    hlo = SPARSE.lower(args).compile().as_text()
    got = SPARSE(args)
    assert_same(got, want)
    assert not collectives(hlo), collectives(hlo)[:3]
    present = [k for k in NAMES if call.get(k) is not None]
    (shapes,) = local_operand_shapes(hlo)
    for name, shape in zip(NAMES, shapes):
        if name in present:
            assert shape == local.get(name, tuple(call[name].shape)), (name, shape)
    return got


# ---- named shardings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["v32", "model1"])
@pytest.mark.parametrize("shards", [2, 4])
def test_data_parallel_splits_both_pools_and_rebases_slot_ids(rng, fmt, shards):
    mesh = mesh_of((shards,), ("x",))
    b = 2 * shards
    call = make_call(rng, fmt, batch=b, heads=4, seqlen_q=2, shards=shards, blocks=2 * shards,
                     extra=(2, 32, 4 * shards))
    specs = {k: P("x") for k in NAMES if k != "attn_sink"}
    out, lse = check_partitioned(mesh, call, specs, local={
        "q": (2, 2, 4, call["q"].shape[3]), "k_cache": (2,) + call["k_cache"].shape[1:], "indices": (2, 2, 64),
        "topk_length": (2,), "extra_k_cache": (4,) + call["extra_k_cache"].shape[1:],
        "extra_indices_in_kvcache": (2, 2, 32), "extra_topk_length": (2,)})
    assert out.sharding.spec[0] == "x" and lse.sharding.spec[0] == "x"
    # Not a vacuous match: rows with entries have output.
    assert np.abs(np.asarray(out, np.float32)).max() > 0


def test_data_parallel_with_replicated_pools_uses_global_ids(rng):
    mesh = mesh_of((2,), ("x",))
    call = make_call(rng, batch=4, heads=4, seqlen_q=2)  # ids anywhere in both pools
    specs = {k: P("x") for k in ("q", "indices", "topk_length", "extra_indices_in_kvcache", "extra_topk_length")}
    check_partitioned(mesh, call, specs, local={
        "q": (2, 2, 4, 576), "indices": (2, 2, 64), "topk_length": (2,), "extra_indices_in_kvcache": (2, 2, 32),
        "extra_topk_length": (2,)})


@pytest.mark.parametrize("split", POOLS)
def test_each_pool_is_split_or_kept_whole_on_its_own(rng, split):
    # The split pool's ids are in the shards' slices; the whole pool's ids are anywhere.
    mesh = mesh_of((2,), ("x",))
    call = make_call(rng, batch=4, heads=2, shards=2, blocks=4, extra=(2, 32, 8))
    other = make_call(rng, batch=4, heads=2, shards=1, blocks=4, extra=(2, 32, 8))
    whole = POOLS[1 - POOLS.index(split)]
    ids_of = {"k_cache": ("indices", "topk_length"), "extra_k_cache": ("extra_indices_in_kvcache",
                                                                       "extra_topk_length")}
    for k in ids_of[whole]:
        call[k] = other[k]
    specs = {k: P("x") for k in NAMES if k not in ("attn_sink", whole)}
    pages = {"k_cache": 2, "extra_k_cache": 4}
    local = {"q": (2, 1, 2, 576), "indices": (2, 1, 64), "topk_length": (2,), "extra_indices_in_kvcache": (2, 1, 32),
             "extra_topk_length": (2,), split: (pages[split],) + call[split].shape[1:]}
    check_partitioned(mesh, call, specs, local=local)


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_head_parallel(rng, fmt):
    mesh = mesh_of((4,), ("h",))
    call = make_call(rng, fmt, batch=2, heads=8, seqlen_q=2)
    d = call["q"].shape[3]
    out, lse = check_partitioned(mesh, call, {"q": P(None, None, "h"), "attn_sink": P("h")},
                                 local={"q": (2, 2, 2, d), "attn_sink": (2,)})
    assert out.sharding.spec[2] == "h" and lse.sharding.spec[1] == "h"


def test_data_and_head_parallel_on_2d_mesh(rng):
    mesh = mesh_of((2, 4), ("x", "h"))
    call = make_call(rng, "model1", batch=4, heads=8, shards=2, blocks=4, extra=(2, 32, 8))
    specs = {k: P("x") for k in NAMES}
    specs.update(q=P("x", None, "h"), attn_sink=P("h"))
    out, lse = check_partitioned(mesh, call, specs, local={
        "q": (2, 1, 2, 512), "k_cache": (2,) + call["k_cache"].shape[1:], "indices": (2, 1, 64), "topk_length": (2,),
        "attn_sink": (2,), "extra_k_cache": (4,) + call["extra_k_cache"].shape[1:],
        "extra_indices_in_kvcache": (2, 1, 32), "extra_topk_length": (2,)})
    assert tuple(out.sharding.spec)[:3] == ("x", None, "h") and tuple(lse.sharding.spec)[:2] == ("x", "h")


def test_batch_over_two_mesh_axes_and_optional_operands_absent(rng):
    mesh = mesh_of((2, 2), ("a", "b"))
    call = make_call(rng, batch=8, heads=2, shards=4, blocks=8, lengths=False, sink=False, extra=None)
    check_partitioned(mesh, call, {"q": P(("a", "b")), "k_cache": P(("a", "b")), "indices": P(("a", "b"))},
                      local={"q": (2, 1, 2, 576), "k_cache": (2,) + call["k_cache"].shape[1:], "indices": (2, 1, 64)})


def test_slot_outside_own_shard_is_an_error_on_cpu(rng):
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU handler checks slot ids; the reference counts an id outside the pool as unused")
    mesh = mesh_of((2,), ("x",))
    call = make_call(rng, batch=4, heads=2, shards=2, blocks=4, lengths=False, extra=None)
    specs = {"q": P("x"), "k_cache": P("x"), "indices": P("x")}
    local_slots = 2 * 61
    for row, slot in ((0, local_slots), (2, local_slots - 1), (3, 0)):
        # Request 2 is shard 1's first: the last slot of shard 0 must not become -1 there.
        ids = np.array(call["indices"])
        ids[row, 0, 5] = slot
        args = place(mesh, dict(call, indices=jnp.asarray(ids)), specs)
        with pytest.raises(Exception, match=r"holds slot \d+, outside the 122 slots of k_cache"):
            jax.block_until_ready(SPARSE(args))


def test_local_slot_ids():
    mesh = mesh_of((2,), ("x",))
    ids = jnp.asarray([-1, -7, INT32_MIN, INT32_MAX, 0, 9, 10, 19, 20, 25], jnp.int32)
    fn = jax.jit(_shard_map(lambda ids: _partition.local_slot_ids(mesh, ("x",), ids, 10)[None], mesh, P(), P("x")))
    got = np.asarray(fn(ids))
    np.testing.assert_array_equal(got[0], [-1, -7, INT32_MIN, INT32_MAX, 0, 9, 10, 19, 20, 25])
    np.testing.assert_array_equal(got[1], [-1, -7, INT32_MIN, INT32_MAX, 10, 10, 0, 9, 20, 25])


FALLBACKS = {
    # name: (mesh shape, axis names, make_call kwargs, specs)
    "q_on_seqlen": ((2,), ("x",), dict(batch=2, heads=2, seqlen_q=2), {"q": P(None, "x")}),
    "pool_on_bytes": ((2,), ("x",), dict(batch=2, heads=2), {"k_cache": P(None, None, None, "x")}),
    "pool_on_pages_q_whole": ((2,), ("x",), dict(batch=2, heads=2), {"k_cache": P("x"), "extra_k_cache": P("x")}),
    "pool_pages_on_other_axis": ((2, 2), ("x", "y"), dict(batch=4, heads=2, shards=2),
                                 {"q": P("x"), "indices": P("x"), "k_cache": P("y"), "extra_k_cache": P("y")}),
    "pool_on_page_rows": ((2,), ("x",), dict(batch=2, heads=2, page=64), {"k_cache": P(None, "x")}),
    "lengths_split_q_whole": ((2,), ("x",), dict(batch=2, heads=2), {"topk_length": P("x"), "indices": P("x")}),
    "indices_on_topk": ((2,), ("x",), dict(batch=2, heads=2), {"indices": P(None, None, "x")}),
    "sink_split_heads_whole": ((2,), ("h",), dict(batch=2, heads=2), {"attn_sink": P("h")}),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_other_shardings_fall_back_to_the_unsharded_result(rng, name):
    shape, names, kwargs, specs = FALLBACKS[name]
    call = make_call(rng, **kwargs)
    assert_same(SPARSE(place(mesh_of(shape, names), call, specs)), SPARSE(call))


def test_gspmd_callbacks(rng):
    call = make_call(rng, batch=4, heads=4, seqlen_q=2, shards=2, blocks=4, extra=(2, 32, 8))
    with gspmd_partitioner():
        mesh = mesh_of((2, 2), ("x", "h"))
        specs = {k: P("x") for k in NAMES}
        specs.update(q=P("x", None, "h"), attn_sink=P("h"))
        fn = jax.jit(sparse)  # a fresh cache: this JAX compiles again with GSPMD
        args = place(mesh, call, specs)
        hlo = fn.lower(args).compile().as_text()
        assert_same(fn(args), SPARSE(call))
        assert not collectives(hlo), collectives(hlo)[:3]
        assert local_operand_shapes(hlo)[0][0] == (2, 2, 2, 576)


def test_vmap_under_named_shardings(rng):
    mesh = mesh_of((2,), ("x",))
    call = make_call(rng, "model1", batch=4, heads=4, shards=2, blocks=4, extra=(2, 32, 8))
    qs = jnp.stack([call["q"], -call["q"], 0.5 * call["q"]])
    fn = jax.jit(jax.vmap(lambda q, call: sparse(dict(call, q=q)), in_axes=(0, None)))
    specs = {k: P("x") for k in NAMES if k not in ("q", "attn_sink")}
    got = fn(jax.device_put(qs, NamedSharding(mesh, P(None, "x"))), place(mesh, call, specs))
    for m in range(3):
        assert_same((got[0][m], got[1][m]), SPARSE(dict(call, q=qs[m])))
    # The mapped axis split, pools whole: the folded batch is split, with global ids and no collective.
    args = (jax.device_put(qs[:2], NamedSharding(mesh, P("x"))), place(mesh, call, {}))
    got = fn(*args)
    for m in range(2):
        assert_same((got[0][m], got[1][m]), SPARSE(dict(call, q=qs[m])))
    hlo = fn.lower(*args).compile().as_text()
    assert not collectives(hlo) and local_operand_shapes(hlo)[0][0] == (4, 1, 4, 512)


def _loss(q, sink, call):
    out, lse = sparse(dict(call, q=q, attn_sink=sink))
    return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))


GRAD = jax.jit(jax.grad(_loss, argnums=(0, 1)))


def _finite_sink(rng, call):
    """The call with a finite attn_sink: the gradient at a sink of +-inf is NaN or 0."""
    return dict(call, attn_sink=jnp.asarray(rng.standard_normal(call["q"].shape[2]), jnp.float32))


def _assert_grads_close(got, want):
    # The tangents are the reference's, partitioned by XLA: the same math in another order.
    for name, g, w in zip(("dq", "d_sink"), got, want):
        assert np.abs(np.asarray(w, np.float32)).max() > 0, name
        assert_close(name, g, w, atol=1e-3, rtol=2.01 / 128, cos_tol=5e-6)


def test_grad_under_named_shardings(rng):
    mesh = mesh_of((2, 2), ("x", "h"))
    call = _finite_sink(rng, make_call(rng, batch=4, heads=4, seqlen_q=2, shards=2, blocks=4, extra=(2, 32, 8)))
    specs = {k: P("x") for k in NAMES}
    specs.update(q=P("x", None, "h"), attn_sink=P("h"))
    args = place(mesh, call, specs)
    got = GRAD(args["q"], args["attn_sink"], args)
    _assert_grads_close(got, GRAD(call["q"], call["attn_sink"], call))
    assert tuple(got[0].sharding.spec)[:3] == ("x", None, "h")


# ---- shard_map --------------------------------------------------------------------------------------------

def _shard_map(fn, mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    from jax.experimental.shard_map import shard_map  # older JAX

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _specs(call, batch=None, heads=None):
    """in_specs of a call: batch-led operands on `batch`, q's heads and attn_sink on `heads`, pools whole."""
    specs = {"q": P(batch, None, heads), "attn_sink": P(heads), "k_cache": P(), "extra_k_cache": P()}
    return {k: None if call.get(k) is None else specs.get(k, P(batch)) for k in NAMES if k in call}


@pytest.mark.parametrize("n", [2, 4])
def test_shard_map_batch_split_with_whole_pools(rng, n):
    mesh = Mesh(np.array(devices_or_skip(n)), ("x",))
    call = make_call(rng, batch=2 * n, heads=4, seqlen_q=2)
    fn = jax.jit(_shard_map(sparse, mesh, (_specs(call, batch="x"),), (P("x"), P("x"))))
    assert_same(fn(call), SPARSE(call))
    assert not collectives(fn.lower(call).compile().as_text())


def test_shard_map_batch_split_with_local_pools(rng):
    # Each device holds its slice of both pools and rebases its requests' ids itself.
    mesh = Mesh(np.array(devices_or_skip(2)), ("x",))
    call = make_call(rng, "model1", batch=4, heads=4, shards=2, blocks=4, extra=(2, 32, 8))

    def local(call):
        call = dict(call)
        for pool, ids in (("k_cache", "indices"), ("extra_k_cache", "extra_indices_in_kvcache")):
            fmt = kv_formats.kv_cache_format_of(call[pool])
            slots = call[pool].shape[0] * fmt.page_size_of(call[pool].shape[1])
            call[ids] = _partition.local_slot_ids(mesh, ("x",), call[ids], slots)
        return sparse(call)

    specs = dict(_specs(call, batch="x"), k_cache=P("x"), extra_k_cache=P("x"))
    assert_same(jax.jit(_shard_map(local, mesh, (specs,), (P("x"), P("x"))))(call), SPARSE(call))


def test_shard_map_head_split(rng):
    mesh = Mesh(np.array(devices_or_skip(4)), ("h",))
    call = make_call(rng, batch=2, heads=8, seqlen_q=2)
    fn = jax.jit(_shard_map(sparse, mesh, (_specs(call, heads="h"),), (P(None, None, "h"), P(None, "h"))))
    assert_same(fn(call), SPARSE(call))


def test_shard_map_results_vary_over_the_split_axis(rng):
    # Typed per device, the results cannot be returned as if every device had them all.
    mesh = Mesh(np.array(devices_or_skip(2)), ("x",))
    call = make_call(rng, batch=4, heads=2, extra=None)
    with pytest.raises(Exception, match="(?i)replicat"):
        jax.jit(_shard_map(lambda c: sparse(c)[0], mesh, (_specs(call, batch="x"),), P()))(call)
    with pytest.raises(Exception, match="(?i)replicat"):
        jax.jit(_shard_map(lambda c: sparse(c)[1], mesh, (_specs(call, heads="x"),), P()))(call)


def test_grad_inside_shard_map(rng):
    # Batch split, sink and pools whole: each device's d_sink covers its own requests, and the
    # public API's cast of the operands to vary alike makes jax.grad sum them over "x".
    mesh = Mesh(np.array(devices_or_skip(2)), ("x",))
    call = _finite_sink(rng, make_call(rng, batch=4, heads=4, seqlen_q=2))

    def local(q, sink, call):
        return jax.grad(_loss, argnums=(0, 1))(q, sink, call)

    specs = _specs(call, batch="x")
    fn = jax.jit(_shard_map(local, mesh, (P("x"), P(), specs), (P("x"), P())))
    _assert_grads_close(fn(call["q"], call["attn_sink"], call), GRAD(call["q"], call["attn_sink"], call))
    # Heads split: q's and the sink's gradients split alike.
    specs = _specs(call, heads="h")
    mesh = Mesh(np.array(devices_or_skip(2)), ("h",))
    fn = jax.jit(_shard_map(local, mesh, (P(None, None, "h"), P("h"), specs), (P(None, None, "h"), P("h"))))
    _assert_grads_close(fn(call["q"], call["attn_sink"], call), GRAD(call["q"], call["attn_sink"], call))
