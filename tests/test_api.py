"""Trace-time behaviour: shapes, abstract evaluation, metadata plans and the error messages."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla import _contract, _ffi
from jax_flashmla.ops.metadata import mla_metadata_p

B, S_Q, H_Q, H_KV, BLOCKS, MAX_BLOCKS = 3, 2, 8, 2, 10, 4


def specs(**changes):
    args = dict(
        q=jax.ShapeDtypeStruct((B, S_Q, H_Q, 576), jnp.bfloat16),
        k_cache=jax.ShapeDtypeStruct((BLOCKS, 64, H_KV, 576), jnp.bfloat16),
        block_table=jax.ShapeDtypeStruct((B, MAX_BLOCKS), jnp.int32),
        cache_seqlens=jax.ShapeDtypeStruct((B,), jnp.int32),
    )
    args.update(changes)
    return args


def test_eval_shape_of_decode_and_metadata():
    args = specs()
    out, lse = jax.eval_shape(lambda a: jfm.flash_mla_with_kvcache(**a, head_dim_v=512, causal=True), args)
    assert out.shape == (B, S_Q, H_Q, 512) and out.dtype == jnp.bfloat16
    assert lse.shape == (B, H_Q, S_Q) and lse.dtype == jnp.float32
    tile_md, num_splits = jax.eval_shape(lambda s: jfm.get_mla_metadata(s, S_Q * H_Q // H_KV, H_KV), args["cache_seqlens"])
    assert tile_md.shape == (_contract.num_sm_parts(132, S_Q * H_Q // H_KV, H_KV), 8) and tile_md.dtype == jnp.int32
    assert num_splits.shape == (B + 1,) and num_splits.dtype == jnp.int32


@pytest.mark.parametrize("rows,h_kv,expected", [(16, 1, 132), (128, 1, 66), (64, 2, 66), (256, 3, 11), (1, 200, 1)])
def test_num_sm_parts_rule(rows, h_kv, expected):
    assert _contract.num_sm_parts(132, rows, h_kv) == expected


@pytest.mark.parametrize("parts", [1, 3, 8, 132])
def test_scheduler_covers_every_page_once(parts):
    rng = np.random.default_rng(parts)
    seqlens = np.concatenate([rng.integers(0, 5000, 20), [0, 1, 64, 65]]).astype(np.int32)
    tile_md, num_splits = _ffi.schedule_tiles_host(seqlens, parts)
    assert tile_md.shape == (parts, 8) and num_splits.shape == (len(seqlens) + 1,)
    pages = -(-seqlens // 64)
    covered = np.zeros(len(seqlens), int)
    pieces = np.zeros(len(seqlens), int)
    for begin_req, begin_page, end_req, end_page, begin_split, *_ in tile_md:
        for req in range(begin_req, end_req + 1):
            lo = begin_page if req == begin_req else 0
            hi = end_page if req == end_req else pages[req]
            assert 0 <= lo <= hi <= pages[req]
            covered[req] += hi - lo
            pieces[req] += 1
    np.testing.assert_array_equal(covered, pages)
    np.testing.assert_array_equal(np.diff(num_splits), pieces)
    assert num_splits[-1] <= len(seqlens) + parts - 1


@pytest.mark.parametrize("parts", [1, 2, 3, 16, 132])
@pytest.mark.parametrize("batch", [1, 7, 300])
def test_split_slots_are_disjoint_and_fit_the_workspace(parts, batch):
    # The workspace has max_accum_slots(parts) slots whatever the batch; the pieces of split
    # request r take slots [2 (num_splits[r] - r), ... + pieces), which must not overlap (mirrors
    # accum_slot() in mla_contract.h).
    rng = np.random.default_rng([parts, batch])
    for trial in range(20):
        seqlens = rng.integers(0, 3000 if trial % 2 else 200, batch).astype(np.int32)
        _, num_splits = _ffi.schedule_tiles_host(seqlens, parts)
        used = np.zeros(_contract.max_accum_slots(parts), int)
        for r in range(batch):
            n = num_splits[r + 1] - num_splits[r]
            assert n >= 1
            if n > 1:
                first = 2 * (num_splits[r] - r)
                assert 0 <= first and first + n <= len(used)
                used[first:first + n] += 1
        assert used.max(initial=0) <= 1


def combining_parts(tile_md, num_splits):
    """The combine kernel's rule (csrc/cuda/combine/combine.cu): part j combines request r when j
    begins with r's last piece of two or more. -> {request: [parts]}"""
    claims = {}
    for j, (begin_req, _, end_req, _, begin_split, *_) in enumerate(tile_md):
        if not 0 <= begin_req < len(num_splits) - 1 or begin_req > end_req:
            continue
        n = num_splits[begin_req + 1] - num_splits[begin_req]
        if begin_split >= 1 and begin_split == n - 1:
            claims.setdefault(int(begin_req), []).append(j)
    return claims


@pytest.mark.parametrize("parts", [1, 2, 3, 16, 66, 132])
@pytest.mark.parametrize("batch", [1, 7, 128])
def test_each_split_request_is_combined_by_exactly_one_part(parts, batch):
    # The combine grid runs over the parts, not the requests: a split request whose last piece
    # began no part would keep an unwritten output, one claimed twice would be written twice.
    rng = np.random.default_rng([parts, batch, 1])
    for trial in range(20):
        seqlens = rng.integers(0, 9000 if trial % 2 else 300, batch).astype(np.int32)
        tile_md, num_splits = _ffi.schedule_tiles_host(seqlens, parts)
        claims = combining_parts(tile_md, num_splits)
        split = [r for r in range(batch) if num_splits[r + 1] - num_splits[r] > 1]
        assert sorted(claims) == split
        assert all(len(js) == 1 for js in claims.values())


def test_scheduler_balances_long_requests():
    seqlens = np.full(4, 64 * 1000, np.int32)
    tile_md, _ = _ffi.schedule_tiles_host(seqlens, 16)
    work = []
    for begin_req, begin_page, end_req, end_page, *_ in tile_md:
        work.append(sum((end_page if r == end_req else 1000) - (begin_page if r == begin_req else 0)
                        for r in range(begin_req, end_req + 1)))
    # 250 pages each, give or take the per-piece overhead the cost model charges.
    assert sum(work) == 4000 and max(work) <= 255 and min(work) >= 225


@pytest.mark.parametrize("parts", [0, -3, 65536, 1.5, True])
def test_num_sm_parts_out_of_range_is_refused(parts):
    # The decode grid holds the parts in its z dimension, which CUDA limits to 65535.
    with pytest.raises(jfm.ContractError, match=re.escape("num_sm_parts: expected a Python int in [1, 65535] or None")):
        jfm.get_mla_metadata(jnp.array([64, 0, 640], jnp.int32), 16, 1, num_sm_parts=parts)


def test_metadata_handler_refuses_more_parts_than_the_grid_holds():
    # Past the Python check (the primitive bound directly), the FFI handler keeps the same bound.
    # Blocked on: a GPU reports a handler's error with the result, not at dispatch.
    with pytest.raises(Exception, match=re.escape("1 <= num_sm_parts <= 65535")):
        jax.block_until_ready(jax.jit(lambda s: mla_metadata_p.bind(s, num_sm_parts=65536))(
            jnp.array([64, 0, 640], jnp.int32)))


def test_largest_part_count_is_accepted_on_cpu():
    tile_md, num_splits = jfm.get_mla_metadata(jnp.array([64, 0, 640], jnp.int32), 16, 1, num_sm_parts=65535)
    assert tile_md.shape == (65535, 8) and num_splits.shape == (4,)


def test_metadata_values_on_cpu():
    tile_md, num_splits = jfm.get_mla_metadata(jnp.array([64, 0, 640], jnp.int32), 16, 1, num_sm_parts=2)
    host_md, host_splits = _ffi.schedule_tiles_host(np.array([64, 0, 640], np.int32), 2)
    np.testing.assert_array_equal(np.asarray(tile_md), host_md)
    np.testing.assert_array_equal(np.asarray(num_splits), host_splits)


def _error(match, **changes):
    args = specs(**changes)
    head_dim_v = args.pop("head_dim_v", 512)
    with pytest.raises(jfm.ContractError, match=match):
        jax.eval_shape(lambda a: jfm.flash_mla_with_kvcache(**a, head_dim_v=head_dim_v), args)


def test_bad_ranks_and_shapes():
    _error(re.escape("q: expected rank 4"), q=jax.ShapeDtypeStruct((B, H_Q, 576), jnp.bfloat16))
    _error(re.escape("k_cache: expected rank 4"), k_cache=jax.ShapeDtypeStruct((BLOCKS, 64, 576), jnp.bfloat16))
    _error(re.escape("block_table: expected shape [3, max_blocks_per_seq >= 1], got shape (2, 4)"),
           block_table=jax.ShapeDtypeStruct((2, 4), jnp.int32))
    _error(re.escape("cache_seqlens: expected shape [3], got shape (3, 1)"),
           cache_seqlens=jax.ShapeDtypeStruct((B, 1), jnp.int32))


def test_bad_head_dims_and_page_size():
    _error(re.escape("q: expected head dim (last axis) 576, got 512"), q=jax.ShapeDtypeStruct((B, S_Q, H_Q, 512), jnp.bfloat16))
    _error(re.escape("k_cache: expected page size (axis 1) 64, got 32"),
           k_cache=jax.ShapeDtypeStruct((BLOCKS, 32, H_KV, 576), jnp.bfloat16))
    _error(re.escape("head_dim_v: expected 512, got 256"), head_dim_v=256)


def test_heads_not_divisible():
    _error(re.escape("q: expected num_heads_q divisible by num_heads_k = 3, got num_heads_q = 8"),
           k_cache=jax.ShapeDtypeStruct((BLOCKS, 64, 3, 576), jnp.bfloat16))


def test_bad_dtypes():
    _error(re.escape("q: expected dtype bfloat16 or float16, got dtype float32"),
           q=jax.ShapeDtypeStruct((B, S_Q, H_Q, 576), jnp.float32))
    _error(re.escape("k_cache: expected the dtype of q (bfloat16), got dtype float16"),
           k_cache=jax.ShapeDtypeStruct((BLOCKS, 64, H_KV, 576), jnp.float16))
    _error(re.escape("block_table: expected dtype int32, got dtype int16"),
           block_table=jax.ShapeDtypeStruct((B, MAX_BLOCKS), jnp.int16))
    _error(re.escape("cache_seqlens: expected dtype int32, got dtype uint32"),
           cache_seqlens=jax.ShapeDtypeStruct((B,), jnp.uint32))


def test_tile_md_with_more_parts_than_the_grid_holds_is_refused():
    with pytest.raises(jfm.ContractError, match=re.escape("got shape (65536, 8)")):
        jax.eval_shape(lambda a, t, n: jfm.flash_mla_with_kvcache(**a, tile_md=t, num_splits=n), specs(),
                       jax.ShapeDtypeStruct((65536, 8), jnp.int32), jax.ShapeDtypeStruct((B + 1,), jnp.int32))


def test_bad_metadata():
    base = specs()
    with pytest.raises(jfm.ContractError, match=re.escape("tile_md: expected shape [num_sm_parts, 8] with 1 <= num_sm_parts "
                                                          "<= 65535, got shape (4, 7)")):
        jax.eval_shape(lambda a, t, n: jfm.flash_mla_with_kvcache(**a, tile_md=t, num_splits=n), base,
                       jax.ShapeDtypeStruct((4, 7), jnp.int32), jax.ShapeDtypeStruct((B + 1,), jnp.int32))
    with pytest.raises(jfm.ContractError, match=re.escape("num_splits: expected shape [4] (batch + 1), got shape (3,)")):
        jax.eval_shape(lambda a, t, n: jfm.flash_mla_with_kvcache(**a, tile_md=t, num_splits=n), base,
                       jax.ShapeDtypeStruct((4, 8), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32))
    with pytest.raises(jfm.ContractError, match="both given or both None"):
        jax.eval_shape(lambda a, t: jfm.flash_mla_with_kvcache(**a, tile_md=t), base, jax.ShapeDtypeStruct((4, 8), jnp.int32))
    with pytest.raises(jfm.ContractError, match=re.escape("cache_seqlens: expected dtype int32, got dtype int64")):
        jfm.get_mla_metadata(np.zeros(3, np.int64), 16, 1)
    with pytest.raises(jfm.ContractError, match="num_heads_k: expected a positive Python int, got 0"):
        jfm.get_mla_metadata(np.zeros(3, np.int32), 16, 0)


def test_bad_scalars():
    args = specs()
    with pytest.raises(jfm.ContractError, match="softmax_scale: expected a finite positive float, got -1.0"):
        jax.eval_shape(lambda a: jfm.flash_mla_with_kvcache(**a, softmax_scale=-1.0), args)
    with pytest.raises(jfm.ContractError, match="causal: expected a Python bool, got 1"):
        jax.eval_shape(lambda a: jfm.flash_mla_with_kvcache(**a, causal=1), args)


def test_kernel_path_on_cpu():
    assert jfm.kernel_path("cpu") == "cpu-ffi"


def test_force_fallback_switch(monkeypatch):
    """JAX_FLASHMLA_FORCE_FALLBACK=1 sends CUDA lowerings to the reference; the CPU keeps its handler."""
    from jax_flashmla import _platform

    monkeypatch.setenv("JAX_FLASHMLA_FORCE_FALLBACK", "1")
    assert _platform.fallback_forced()
    assert jfm.kernel_path("cuda") == "reference-fallback"
    assert jfm.kernel_path("cpu") == "cpu-ffi"
    monkeypatch.setenv("JAX_FLASHMLA_FORCE_FALLBACK", "0")
    assert not _platform.fallback_forced()


# ---- array arguments given as lists or numpy arrays --------------------------------------------------

def test_lists_and_numpy_arrays_give_the_same_result_as_arrays():
    from mla_cases import make_case

    q, k, bt, sl = make_case(40, batch=3, seqlen_q=2, heads_q=4)
    want = jfm.flash_mla_with_kvcache(q, k, bt, sl, causal=True)
    # numpy arrays of every argument, and the int32 ones as plain lists (JAX's default int is int32)
    got = jfm.flash_mla_with_kvcache(np.asarray(q), np.asarray(k), np.asarray(bt).tolist(), np.asarray(sl).tolist(),
                                     causal=True)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    plan = jfm.get_mla_metadata(np.asarray(sl).tolist(), 2 * 4, 1, num_sm_parts=3)
    for g, w in zip(plan, jfm.get_mla_metadata(sl, 2 * 4, 1, num_sm_parts=3)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_a_list_keeps_the_dtype_rules():
    # A list of floats converts to float32, which the kernel does not take: the error names q.
    q = np.zeros((B, S_Q, H_Q, 576), np.float32).tolist()
    with pytest.raises(jfm.ContractError, match=re.escape("q: expected dtype bfloat16 or float16, got dtype float32")):
        jfm.flash_mla_with_kvcache(q, jnp.zeros((BLOCKS, 64, H_KV, 576), jnp.bfloat16),
                                   jnp.zeros((B, MAX_BLOCKS), jnp.int32), jnp.zeros((B,), jnp.int32))


@pytest.mark.parametrize("bad", ["abc", [[1, 2], [3]], None, object()], ids=["string", "ragged", "none", "object"])
@pytest.mark.parametrize("name", ["q", "k_cache", "block_table", "cache_seqlens"])
def test_unconvertible_array_argument_is_named(name, bad):
    args = dict(q=jnp.zeros((B, S_Q, H_Q, 576), jnp.bfloat16), k_cache=jnp.zeros((BLOCKS, 64, H_KV, 576), jnp.bfloat16),
                block_table=jnp.zeros((B, MAX_BLOCKS), jnp.int32), cache_seqlens=jnp.zeros((B,), jnp.int32))
    args[name] = bad
    with pytest.raises(jfm.ContractError, match=re.escape(f"{name}: expected an array")):
        jfm.flash_mla_with_kvcache(**args)


@pytest.mark.parametrize("bad", ["abc", [[1, 2], [3]]], ids=["string", "ragged"])
def test_unconvertible_plan_and_metadata_arguments_are_named(bad):
    args = specs()
    with pytest.raises(jfm.ContractError, match=re.escape("tile_md: expected an array")):
        jax.eval_shape(lambda a, n: jfm.flash_mla_with_kvcache(**a, tile_md=bad, num_splits=n), args,
                       jax.ShapeDtypeStruct((B + 1,), jnp.int32))
    with pytest.raises(jfm.ContractError, match=re.escape("num_splits: expected an array")):
        jax.eval_shape(lambda a, t: jfm.flash_mla_with_kvcache(**a, tile_md=t, num_splits=bad), args,
                       jax.ShapeDtypeStruct((4, 8), jnp.int32))
    with pytest.raises(jfm.ContractError, match=re.escape("cache_seqlens: expected an array")):
        jfm.get_mla_metadata(bad, 16, 1)


# ---- static arguments given as traced values ------------------------------------------------------------

def _static_error(name):
    message = (re.escape(f"{name}: expected a static Python value, got a traced value ") + ".*"
               + re.escape(f"(mark it static: jax.jit(..., static_argnames=('{name}',)))"))
    return pytest.raises(jfm.ContractError, match=message)


@pytest.mark.parametrize("name,value", [("softmax_scale", 0.1), ("causal", True), ("head_dim_v", 512)])
def test_traced_static_decode_argument_is_refused_with_a_hint(name, value):
    args = specs()
    with _static_error(name):
        jax.eval_shape(lambda a, v: jfm.flash_mla_with_kvcache(**a, **{name: v}), args, value)


def test_static_decode_arguments_work_when_marked_static():
    from mla_cases import make_case

    q, k, bt, sl = make_case(41, batch=2)
    fn = jax.jit(jfm.flash_mla_with_kvcache, static_argnames=("softmax_scale", "causal", "head_dim_v"))
    got = fn(q, k, bt, sl, head_dim_v=512, softmax_scale=0.05, causal=True)
    want = jfm.flash_mla_with_kvcache(q, k, bt, sl, head_dim_v=512, softmax_scale=0.05, causal=True)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("name", ["num_q_tokens_per_head_k", "num_heads_k", "num_sm_parts"])
def test_traced_static_metadata_argument_is_refused_with_a_hint(name):
    kwargs = dict(num_q_tokens_per_head_k=16, num_heads_k=1, num_sm_parts=4)
    with _static_error(name):
        jax.jit(lambda s, v: jfm.get_mla_metadata(s, **{**kwargs, name: v}))(jnp.array([64, 0, 640], jnp.int32),
                                                                              kwargs[name])
