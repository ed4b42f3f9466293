"""get_mla_metadata in FlashMLA's three forms (the dense arrays; the 2025-09 form with num_heads_q,
is_fp8_kvcache and topk; the argument-free FlashMLASchedMeta), each passed to dense and sparse calls:
results equal to the call without a plan, under jit (the plan an argument), vmap and named
shardings; the errors of plans that do not fit their call; the README's port example."""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_flashmla as jfm
from mla_cases import devices_or_skip, make_case
from sparse_cases import make_indices

B, S_Q, H_Q, H_KV = 3, 2, 4, 1
ROWS = S_Q * H_Q // H_KV
TOPK, PAGE, BLOCKS = 64, 61, 3


def dense_case(seed=0, batch=B, heads_q=H_Q, heads_k=H_KV):
    return make_case(seed, batch=batch, seqlen_q=S_Q, heads_q=heads_q, heads_k=heads_k)


def sparse_case(seed=0, batch=B, heads_q=H_Q, topk=TOPK):
    """(q, FP8 V3.2 pool, indices) of a small sparse decode."""
    rng = np.random.default_rng(seed)
    kv = jnp.asarray(np.clip(rng.standard_normal((BLOCKS, PAGE, 1, 576)) / 10, -1, 1), jnp.bfloat16)
    q = jnp.asarray(np.clip(rng.standard_normal((batch, S_Q, heads_q, 576)), -1, 1), jnp.bfloat16)
    ids = make_indices(rng, batch=batch, seqlen_q=S_Q, topk=topk, num_slots=BLOCKS * PAGE, invalid=0.2)
    return q, jfm.quantize_kv_cache(kv, "v32"), jnp.asarray(ids)


def dense_call(case, plan=(None, None), **kw):
    q, k, bt, sl = case
    return jfm.flash_mla_with_kvcache(q, k, bt, sl, 512, *plan, causal=True, **kw)


def sparse_call(case, plan=(None, None), cache_seqlens=None):
    q, pool, ids = case
    return jfm.flash_mla_with_kvcache(q, pool, None, cache_seqlens, 512, *plan, None, False, True, ids)


def assert_equal(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


# ---- each form, with the call it is for -------------------------------------------------------------------

DENSE_FORMS = {
    "dense": lambda sl: jfm.get_mla_metadata(sl, ROWS, H_KV),
    "2025-09 dense": lambda sl: jfm.get_mla_metadata(sl, ROWS, H_KV, H_Q, False, None),
    "argument-free": lambda sl: jfm.get_mla_metadata(),
}
SPARSE_FORMS = {
    "2025-09 sparse": lambda sl: jfm.get_mla_metadata(sl, ROWS, 1, H_Q, True, TOPK),
    "argument-free": lambda sl: jfm.get_mla_metadata(),
}


@pytest.mark.parametrize("form", list(DENSE_FORMS))
def test_dense_call_with_each_form_equals_the_plain_call(form):
    case = dense_case(1)
    plan = DENSE_FORMS[form](case[3])
    assert_equal(dense_call(case, plan), dense_call(case))


@pytest.mark.parametrize("form", list(SPARSE_FORMS))
def test_sparse_call_with_each_form_equals_the_plain_call(form):
    case = sparse_case(2)
    sl = jnp.zeros((B,), jnp.int32)  # FlashMLA 2025-09's sparse calls pass cache_seqlens; it goes unused
    plan = SPARSE_FORMS[form](sl)
    assert_equal(sparse_call(case, plan, cache_seqlens=sl), sparse_call(case))


def test_what_each_form_returns():
    sl = jnp.array([5, 0, 700], jnp.int32)
    tile_md, num_splits = jfm.get_mla_metadata(sl, ROWS, H_KV)
    assert tile_md.dtype == jnp.int32 and tile_md.shape[1] == 8 and num_splits.shape == (B + 1,)
    # num_heads_q and is_fp8_kvcache=False change nothing of the dense plan
    for got, want in zip(jfm.get_mla_metadata(sl, ROWS, H_KV, H_Q, False, None), (tile_md, num_splits)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    meta, none = jfm.get_mla_metadata(sl, ROWS, 1, H_Q, True, TOPK)
    assert none is None and isinstance(meta, jfm.FlashMLASchedMeta)
    assert (meta.layout.batch, meta.layout.num_heads_q, meta.layout.topk, meta.layout.is_fp8_kvcache) == (B, H_Q, TOPK,
                                                                                                            True)
    meta, none = jfm.get_mla_metadata(sl, ROWS, 1, H_Q, is_fp8_kvcache=True)  # dense over an FP8 pool
    assert none is None and meta.layout.topk is None and meta.layout.is_fp8_kvcache
    assert jfm.get_mla_metadata() == (jfm.FlashMLASchedMeta(), None)


def test_sparse_form_reads_only_the_length_of_cache_seqlens():
    # Under jit cache_seqlens is traced: the sparse form needs its shape only, as FlashMLA's plan
    # used topk in place of the lengths.
    meta, _ = jax.jit(lambda sl: jfm.get_mla_metadata(sl, ROWS, 1, H_Q, True, TOPK))(jnp.zeros((B,), jnp.int32))
    assert meta == jfm.get_mla_metadata(np.zeros(B, np.int32), ROWS, 1, H_Q, True, TOPK)[0]


def test_flashmla_keyword_names():
    case = dense_case(18)
    q, k, bt, sl = case
    want = jfm.get_mla_metadata(sl, ROWS, H_KV)
    plan = jfm.get_mla_metadata(cache_seqlens=sl, num_heads_per_head_k=ROWS, num_heads_k=H_KV)  # before 2025-09
    for got, w in zip(plan, want):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(w))
    got = jfm.flash_mla_with_kvcache(q, k, bt, sl, 512, tile_scheduler_metadata=plan[0], num_splits=plan[1],
                                     causal=True)
    assert_equal(got, dense_call(case))
    with _error("tile_scheduler_metadata: expected None when tile_md is given (it is FlashMLA's name for tile_md)"):
        jfm.flash_mla_with_kvcache(q, k, bt, sl, 512, *plan, tile_scheduler_metadata=plan[0])
    with _error("num_heads_per_head_k: expected None when num_q_tokens_per_head_k is given"):
        jfm.get_mla_metadata(sl, ROWS, H_KV, num_heads_per_head_k=ROWS)


# ---- jit, vmap, named shardings -------------------------------------------------------------------------------

def test_plan_object_as_a_jit_argument_compiles_once():
    traces = []

    @jax.jit
    def step(case, plan):
        traces.append(1)
        return dense_call(case, plan)

    case = dense_case(3)
    want = dense_call(case)
    for _ in range(2):  # a fresh FlashMLASchedMeta() equals the last one: no new trace
        assert_equal(step(case, jfm.get_mla_metadata()), want)
    assert len(traces) == 1
    assert_equal(step(case, jfm.get_mla_metadata(case[3], ROWS, H_KV)), want)  # arrays: a new trace
    assert len(traces) == 2


def test_sparse_plan_as_a_jit_argument_and_result():
    case = sparse_case(4)
    plan = jax.jit(lambda sl: jfm.get_mla_metadata(sl, ROWS, 1, H_Q, True, TOPK))(jnp.zeros((B,), jnp.int32))
    got = jax.jit(sparse_call)(case, plan)
    assert_equal(got, sparse_call(case))


def test_plan_made_inside_jit_for_each_layer():
    case = dense_case(5)

    @jax.jit
    def two_layers(case):
        plan = jfm.get_mla_metadata()
        return dense_call(case, plan), dense_call(case, plan, softmax_scale=0.05)

    first, second = two_layers(case)
    assert_equal(first, dense_call(case))
    assert_equal(second, dense_call(case, softmax_scale=0.05))


def test_vmap_with_the_plan_an_argument():
    cases = [dense_case(6 + m) for m in range(2)]
    stacked = [jnp.stack(parts) for parts in zip(*cases)]
    got = jax.vmap(lambda c, plan: dense_call(c, plan))(stacked, jfm.get_mla_metadata())
    for m in range(2):
        assert_equal([g[m] for g in got], dense_call(cases[m]))
    sparse = [sparse_case(8 + m) for m in range(2)]
    q, pool, ids = (jnp.stack(parts) for parts in zip(*sparse))
    plan = jfm.get_mla_metadata(jnp.zeros((B,), jnp.int32), ROWS, 1, H_Q, True, TOPK)  # a member's layout
    got = jax.vmap(lambda q, pool, ids, plan: sparse_call((q, pool, ids), plan), in_axes=(0, 0, 0, None))(
        q, pool, ids, plan)
    for m in range(2):
        assert_equal([g[m] for g in got], sparse_call(sparse[m]))


def test_vmap_plan_made_inside_from_mapped_lengths():
    sparse = [sparse_case(10 + m) for m in range(2)]
    q, pool, ids = (jnp.stack(parts) for parts in zip(*sparse))
    lens = jnp.zeros((2, B), jnp.int32)
    got = jax.vmap(lambda q, pool, ids, sl: sparse_call(
        (q, pool, ids), jfm.get_mla_metadata(sl, ROWS, 1, H_Q, True, TOPK)))(q, pool, ids, lens)
    for m in range(2):
        assert_equal([g[m] for g in got], sparse_call(sparse[m]))


def test_named_shardings_with_the_plan_object():
    mesh = Mesh(np.array(devices_or_skip(4)).reshape(2, 2), ("x", "h"))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    q, k, bt, sl = make_case(12, batch=4, seqlen_q=S_Q, heads_q=4, shards=2)
    args = (put(q, P("x", None, "h")), put(k, P("x")), put(bt, P("x")), put(sl, P("x")))
    fn = jax.jit(lambda case, plan: dense_call(case, plan))
    plan = jfm.get_mla_metadata()
    assert_equal(fn(args, plan), dense_call((q, k, bt, sl)))
    assert "all-gather" not in fn.lower(args, plan).compile().as_text()
    case = sparse_case(13, batch=4)
    sharded = (put(case[0], P("x", None, "h")), case[1], put(case[2], P("x")))
    plan = jfm.get_mla_metadata(jnp.zeros((4,), jnp.int32), ROWS, 1, H_Q, True, TOPK)
    assert_equal(jax.jit(sparse_call)(sharded, plan), sparse_call(case))


# ---- plans that do not fit their call --------------------------------------------------------------------------

def _error(message):
    return pytest.raises(jfm.ContractError, match=re.escape(message))


def _dense_error(case, plan, message):
    with _error(message):
        jax.eval_shape(lambda c: dense_call(c, plan), case)


def _sparse_error(case, plan, message):
    with _error(message):
        jax.eval_shape(lambda c: sparse_call(c, plan), case)


def test_dense_call_refuses_a_plan_of_another_layout():
    case = dense_case(14)
    sl = jnp.zeros((B,), jnp.int32)
    fp8 = jfm.get_mla_metadata(sl, ROWS, H_KV, H_Q, True)
    _dense_error(case, fp8, "tile_md: expected a plan for is_fp8_kvcache=False, got a plan made for is_fp8_kvcache=True")
    sparse = jfm.get_mla_metadata(sl, ROWS, 1, H_Q, True, TOPK)
    _dense_error(case, sparse, "tile_md: expected a plan for dense decode (no indices), got a plan made for sparse "
                               "decode (topk=64)")


def test_sparse_call_refuses_a_plan_of_another_layout():
    case = sparse_case(15)
    sl = jnp.zeros((B,), jnp.int32)
    plan = lambda **kw: jfm.get_mla_metadata(**{**dict(cache_seqlens=sl, num_q_tokens_per_head_k=ROWS, num_heads_k=1,
                                                       num_heads_q=H_Q, is_fp8_kvcache=True, topk=TOPK), **kw})
    _sparse_error(case, plan(cache_seqlens=sl[:2]),
                  "tile_md: expected a plan for batch 3 (q's axis 0), got a plan made for batch 2 (cache_seqlens' length)")
    _sparse_error(case, plan(topk=128), "tile_md: expected a plan for topk 64 (indices' last axis), got a plan made "
                                        "for topk=128")
    _sparse_error(case, plan(num_heads_q=2 * H_Q, num_q_tokens_per_head_k=2 * ROWS),
                  "tile_md: expected a plan for num_heads_q = 4 (q's axis 2), got a plan made for num_heads_q = 8")
    _sparse_error(case, plan(num_q_tokens_per_head_k=H_Q),  # s_q 1
                  "tile_md: expected a plan for num_q_tokens_per_head_k = 8 (s_q * num_heads_q // num_heads_k of q, "
                  "k_cache), got a plan made for num_q_tokens_per_head_k = 4")
    _sparse_error(case, plan(is_fp8_kvcache=True, topk=None), "tile_md: expected a plan for sparse decode (indices "
                                                              "with topk 64), got a plan made for dense decode")
    _sparse_error(case, jfm.get_mla_metadata(sl, ROWS, 1),
                  "tile_md: expected None or, in tile_md, a FlashMLASchedMeta in sparse decode")


def test_dense_call_refuses_a_plan_of_other_rows_or_heads():
    # get_mla_metadata records no layout in a dense bf16/fp16 plan; a recorded one is checked all the same.
    from jax_flashmla.ops.metadata import PlanLayout

    meta = lambda rows, h_kv: (jfm.FlashMLASchedMeta(PlanLayout(B, rows, h_kv, None, False, None)), None)
    case = dense_case(16)
    assert_equal(dense_call(case, meta(ROWS, H_KV)), dense_call(case))
    _dense_error(case, meta(ROWS + 1, H_KV), "tile_md: expected a plan for num_q_tokens_per_head_k = 8")
    _dense_error(dense_case(16, heads_q=4, heads_k=2), meta(ROWS, 1),
                 "tile_md: expected a plan for num_heads_k = 2 (k_cache's axis 2), got a plan made for num_heads_k = 1")


def test_plan_arguments_in_the_wrong_places():
    case = dense_case(17)
    meta = jfm.FlashMLASchedMeta()
    tile_md, num_splits = jfm.get_mla_metadata(case[3], ROWS, H_KV)
    _dense_error(case, (meta, num_splits), "num_splits: expected None with a FlashMLASchedMeta in tile_md")
    _dense_error(case, (tile_md, meta), "num_splits: expected an int32 array or None (a FlashMLASchedMeta goes in "
                                        "tile_md), got a FlashMLASchedMeta")
    _dense_error(case, (None, num_splits), "tile_md/num_splits: expected both given or both None")
    _sparse_error(sparse_case(17), (None, num_splits), "num_splits: expected None or, in tile_md, a FlashMLASchedMeta")


def test_metadata_argument_errors():
    sl = jnp.zeros((B,), jnp.int32)
    cases = [
        (lambda: jfm.get_mla_metadata(None, ROWS, H_KV), "cache_seqlens: expected an array when num_q_tokens_per_head_k "
                                                          "is given"),
        (lambda: jfm.get_mla_metadata(num_sm_parts=4), "cache_seqlens: expected an array when num_sm_parts is given"),
        (lambda: jfm.get_mla_metadata(topk=64), "cache_seqlens: expected an array when topk is given"),
        (lambda: jfm.get_mla_metadata(sl, ROWS, 1, topk=TOPK, is_fp8_kvcache=True),
         "num_heads_q: expected a positive Python int with topk (sparse decode), got None"),
        (lambda: jfm.get_mla_metadata(sl, ROWS, 1, H_Q, False, TOPK),
         "is_fp8_kvcache: expected True with topk (sparse decode reads an FP8 pool), got False"),
        (lambda: jfm.get_mla_metadata(sl, ROWS, 2, H_Q, True, TOPK),
         "num_heads_k: expected 1 with topk (sparse decode reads one KV head), got 2"),
        (lambda: jfm.get_mla_metadata(sl, ROWS, 1, H_Q, True, 0), "topk: expected a positive Python int, got 0"),
        (lambda: jfm.get_mla_metadata(sl, ROWS, 2, 3), "num_heads_q: expected a multiple of num_heads_k = 2, got 3"),
        (lambda: jfm.get_mla_metadata(sl, 6, 1, 4), "num_q_tokens_per_head_k: expected s_q * num_heads_q // "
                                                    "num_heads_k, a multiple of 4, got 6"),
        (lambda: jfm.get_mla_metadata(sl, ROWS, 1, H_Q, 1), "is_fp8_kvcache: expected a Python bool, got 1"),
        (lambda: jfm.get_mla_metadata(sl, ROWS, 1, H_Q, True, TOPK, num_sm_parts=4),
         "num_sm_parts: expected None with is_fp8_kvcache=True or topk (those calls plan themselves), got 4"),
    ]
    for fn, message in cases:
        with _error(message):
            fn()
    with _error("topk: expected a static Python value, got a traced value"):
        jax.jit(lambda t: jfm.get_mla_metadata(sl, ROWS, 1, H_Q, True, t))(TOPK)


# ---- the README's port example ----------------------------------------------------------------------------------

def test_readme_port_snippet_runs():
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Plans: get_mla_metadata", 1)[1].split("\n### ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]
    assert len(blocks) >= 2
    scope = {}
    for block in blocks:
        exec(compile(block, "README.md (Plans)", "exec"), scope)


def test_dense_fp8_call_takes_the_fp8_plan_and_refuses_others():
    from jax_flashmla.ops.metadata import PlanLayout

    q, pool, _ = sparse_case(18)
    block_table = jnp.asarray([[0, 1, 2], [2, 0, 1], [1, 2, 0]], jnp.int32)
    sl = jnp.asarray([5, 120, 0], jnp.int32)
    call = lambda plan: jfm.flash_mla_with_kvcache(q, pool, block_table, sl, 512, *plan, causal=True,
                                                   is_fp8_kvcache=True)
    plain = call((None, None))
    assert_equal(call(jfm.get_mla_metadata(sl, ROWS, 1, H_Q, True)), plain)
    assert_equal(call(jfm.get_mla_metadata()), plain)
    with _error("tile_md: expected None or, in tile_md, a FlashMLASchedMeta in dense decode over an FP8 pool"):
        call(jfm.get_mla_metadata(sl, ROWS, 1))
    with _error("tile_md: expected a plan for is_fp8_kvcache=True, got a plan made for is_fp8_kvcache=False"):
        call((jfm.FlashMLASchedMeta(PlanLayout(B, ROWS, 1, H_Q, False, None)), None))
    with _error("tile_md: expected a plan for dense decode (no indices)"):
        call(jfm.get_mla_metadata(sl, ROWS, 1, H_Q, True, TOPK))
