"""The SM90 kernel against the pure-JAX reference: FlashMLA's correctness matrix and tolerances.

Runs only where decode calls lower to the CUDA kernel (`jax_flashmla.kernel_path() == "cuda-sm90"`:
an SM90 GPU, JAX's CUDA plugin and an extension built with nvcc); skipped everywhere else.

Coverage. The axes of FlashMLA's decode test matrix are
  batch {1, 2, 6, 64} x s_q {1, 2, 4} x s_k {20, 140, 4096} x (h_q, h_kv) with h_q in
  {1, 3, 9, 63, 64, 126, 128}, h_kv in {1, 2, 3, 8} dividing h_q x lengths {fixed, varlen,
  varlen with zeros} x causal x dtype {bf16, fp16} x block-table padding {-1, 2**31 - 1, 10**6}.
Their cross product is far too large, so MATRIX is a pairwise covering design over them (every value
of every axis, and every pair of values of any two axes, appears in some case; built
deterministically below), leaving out batch 64 with s_k 4096; HEAVY adds that corner
(b=64, s_k=4096, h_q=128) a few times. Every problem has shuffled pages, NaN in every cache slot
no request uses and block-table padding that points nowhere (tests/conftest.py: make_problem).

Tolerances are FlashMLA's: cos_diff(out, ref) < 1e-5 with cos_diff = 1 - 2 sum(xy) / sum(x^2 + y^2)
in float64, and lse within rtol 8/65536 (atol 1e-5 for values near 0); rows with no visible key must
give out = 0 and lse = +inf exactly. The reference is computed in float32 from the same bf16/fp16
inputs (jax_flashmla.reference's math, without rounding its output to the input dtype).

Every kernel call is preceded by allocating and freeing NaN-filled buffers of the outputs' sizes,
so a kernel that leaves an output element unwritten shows up as NaN (the allocator hands the freed
memory to the next allocation of that size).

Setting JAX_FLASHMLA_GPU_TESTS_ON_CPU=1 runs this file on the CPU FFI path instead (to check the
test code itself where there is no GPU; the heavy cases are slow there, select with -k).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import random
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla import _contract
from jax_flashmla import reference as _reference
from conftest import cos_diff, make_problem

_ON_CPU = os.environ.get("JAX_FLASHMLA_GPU_TESTS_ON_CPU") == "1"
EXPECTED_PATH = "cpu-ffi" if _ON_CPU else "cuda-sm90"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jfm.kernel_path() != EXPECTED_PATH,
                       reason=f"decode lowers to {jfm.kernel_path()!r}, not the SM90 kernel "
                              "(needs an SM90 GPU, JAX's CUDA plugin and a CUDA build)"),
]

D_V = jfm.HEAD_DIM_V
PAGE = jfm.PAGE_SIZE
COS_DIFF_MAX = 1e-5
LSE_RTOL = 8 / 65536
LSE_ATOL = 1e-5
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16}


# ---- the covering design -------------------------------------------------------------------------

HEAD_PAIRS = [(h_q, h_kv) for h_q in (1, 3, 9, 63, 64, 126, 128) for h_kv in (1, 2, 3, 8) if h_q % h_kv == 0]
AXES = {
    "batch": [1, 2, 6, 64],
    "seqlen_q": [1, 2, 4],
    "seqlen_k": [20, 140, 4096],
    "heads": HEAD_PAIRS,
    "lengths": ["fixed", "varlen", "zeros"],
    "causal": [False, True],
    "dtype": ["bf16", "fp16"],
    "pad": [-1, 2**31 - 1, 10**6],
}


def _allowed(case: dict) -> bool:
    # b=64 with s_k=4096 is the expensive corner (host-side data, reference memory): HEAVY has it.
    return not (case.get("batch") == 64 and case.get("seqlen_k") == 4096)


def pairwise_cases(axes: dict, allowed, seed: int = 0, candidates: int = 50) -> list[dict]:
    """A greedy pairwise covering array: every allowed pair of values of two axes is in some row.

    Each row starts from an uncovered pair and fills the other axes one at a time (random order)
    with the value covering the most still-uncovered pairs; the best of `candidates` such rows is
    kept. Deterministic for a given seed."""
    names = list(axes)
    rng = random.Random(seed)

    def value(i, v):
        return axes[names[i]][v]

    def row_ok(row):
        return allowed({names[i]: value(i, v) for i, v in row.items()})

    uncovered = {(a, va, b, vb)
                 for a, b in itertools.combinations(range(len(names)), 2)
                 for va in range(len(axes[names[a]])) for vb in range(len(axes[names[b]]))
                 if row_ok({a: va, b: vb})}
    rows = []
    while uncovered:
        best = None
        for _ in range(candidates):
            a, va, b, vb = rng.choice(sorted(uncovered))
            row = {a: va, b: vb}
            rest = [i for i in range(len(names)) if i not in row]
            rng.shuffle(rest)
            for i in rest:
                options = []
                for v in range(len(axes[names[i]])):
                    trial = {**row, i: v}
                    if not row_ok(trial):
                        continue
                    gain = sum((min(i, k), trial[min(i, k)], max(i, k), trial[max(i, k)]) in uncovered for k in row)
                    options.append((gain, rng.random(), v))
                row[i] = max(options)[2]
            gain = sum((i, row[i], k, row[k]) in uncovered for i, k in itertools.combinations(range(len(names)), 2))
            if best is None or gain > best[0]:
                best = (gain, row)
        row = best[1]
        uncovered -= {(i, row[i], k, row[k]) for i, k in itertools.combinations(range(len(names)), 2)}
        rows.append({names[i]: value(i, row[i]) for i in range(len(names))})
    return rows


MATRIX = pairwise_cases(AXES, _allowed)
HEAVY = [
    dict(batch=64, seqlen_q=1, seqlen_k=4096, heads=(128, 1), lengths="varlen", causal=False, dtype="bf16", pad=-1),
    dict(batch=64, seqlen_q=2, seqlen_k=4096, heads=(128, 1), lengths="zeros", causal=True, dtype="fp16", pad=2**31 - 1),
    dict(batch=64, seqlen_q=4, seqlen_k=4096, heads=(128, 1), lengths="fixed", causal=True, dtype="bf16", pad=10**6),
]


def case_id(case: dict) -> str:
    h_q, h_kv = case["heads"]
    return (f"b{case['batch']}-sq{case['seqlen_q']}-sk{case['seqlen_k']}-hq{h_q}-hkv{h_kv}-{case['lengths']}"
            f"-{'causal' if case['causal'] else 'full'}-{case['dtype']}-pad{case['pad']}")


def test_covering_design_covers_every_pair():
    # The design itself: every value of every axis, and every allowed pair, appears.
    for name, values in AXES.items():
        assert {repr(c[name]) for c in MATRIX} == {repr(v) for v in values}, name
    for a, b in itertools.combinations(AXES, 2):
        seen = {(repr(c[a]), repr(c[b])) for c in MATRIX}
        for va, vb in itertools.product(AXES[a], AXES[b]):
            if _allowed({a: va, b: vb}):
                assert (repr(va), repr(vb)) in seen, (a, va, b, vb)


# ---- problems, calls and checks ------------------------------------------------------------------

def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def draw_lengths(rng, batch: int, seqlen_k: int, kind: str) -> np.ndarray:
    """fixed: all s_k; varlen: Normal(s_k, s_k / 2) clipped to >= 1 (FlashMLA's draw); zeros: varlen
    with about a third of the requests (at least one) set to 0."""
    if kind == "fixed":
        return np.full(batch, seqlen_k, np.int32)
    lengths = np.maximum(rng.normal(seqlen_k, seqlen_k / 2, size=batch), 1).astype(np.int32)
    if kind == "zeros":
        zero = rng.random(batch) < 1 / 3
        zero[rng.integers(batch)] = True
        lengths[zero] = 0
    return lengths


@functools.partial(jax.jit, static_argnames=("softmax_scale", "causal"))
def reference_f32(q, k_cache, block_table, cache_seqlens, *, softmax_scale, causal):
    """The reference math in float32 from the same bf16/fp16 values (out not rounded to q's dtype)."""
    return _reference.reference_math(q.astype(jnp.float32), k_cache.astype(jnp.float32), block_table,
                                     cache_seqlens, D_V, softmax_scale, causal)


def _poison_allocator(*avals) -> None:
    """Allocates NaN-filled buffers of the given (shape, dtype)s and frees them, so the next
    allocations of those sizes likely reuse NaN memory: unwritten outputs then read as NaN."""
    buffers = [jnp.full(shape, jnp.nan, dtype) for shape, dtype in avals]
    jax.block_until_ready(buffers)
    for buf in buffers:
        buf.delete()


def device_args(problem):
    return tuple(jnp.asarray(a) for a in problem.args)


def rows_per_head_k(q, k_cache) -> int:
    return q.shape[1] * q.shape[2] // k_cache.shape[2]


def plan(args, num_sm_parts=None):
    q, k_cache, _, cache_seqlens = args
    return jfm.get_mla_metadata(cache_seqlens, rows_per_head_k(q, k_cache), k_cache.shape[2],
                                num_sm_parts=num_sm_parts)


def run_kernel(args, *, causal, metadata=None, softmax_scale=None):
    """One eager decode call on poisoned memory; metadata=None lets the call plan itself."""
    q = args[0]
    b, s_q, h_q, _ = q.shape
    _poison_allocator(((b, s_q, h_q, D_V), q.dtype), ((b, h_q, s_q), jnp.float32))
    md = (None, None) if metadata is None else metadata
    out, lse = jfm.flash_mla_with_kvcache(*args, D_V, *md, softmax_scale=softmax_scale, causal=causal)
    return jax.block_until_ready((out, lse))


def check_against_reference(args, out, lse, *, causal, softmax_scale=None):
    """FlashMLA's checks plus the contract's exact ones; returns (out f32, lse) as NumPy arrays."""
    q, k_cache, block_table, cache_seqlens = args
    b, s_q, h_q, _ = q.shape
    assert out.shape == (b, s_q, h_q, D_V) and out.dtype == q.dtype
    assert lse.shape == (b, h_q, s_q) and lse.dtype == jnp.float32
    scale = _contract.check_softmax_scale(softmax_scale)
    ref_out, ref_lse = reference_f32(q, k_cache, block_table, cache_seqlens, softmax_scale=scale, causal=causal)
    out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
    ref_out, ref_lse = np.asarray(ref_out), np.asarray(ref_lse)

    # Every element written and finite (out); lse is finite or +inf, never NaN or -inf.
    assert np.isfinite(out).all(), f"{np.count_nonzero(~np.isfinite(out))} non-finite out elements"
    assert not np.isnan(lse).any() and not np.isneginf(lse).any()

    # Rows with no visible key: out = 0 and lse = +inf, exactly; every other row: finite lse.
    n_visible = np.asarray(_reference.visible_key_limit(cache_seqlens, s_q, causal))  # [b, s_q]
    empty = n_visible == 0
    assert (out[empty] == 0).all(), "rows with no visible key must give out = 0"
    lse_rows = lse.transpose(0, 2, 1)  # [b, s_q, h_q]
    assert np.isposinf(lse_rows[empty]).all(), "rows with no visible key must give lse = +inf"
    assert np.isfinite(lse_rows[~empty]).all(), "rows with visible keys must give a finite lse"
    np.testing.assert_array_equal(np.isposinf(lse), np.isposinf(ref_lse))

    diff = cos_diff(out, ref_out)
    assert diff < COS_DIFF_MAX, f"out: cos_diff {diff:.3g} >= {COS_DIFF_MAX}"
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=LSE_RTOL, atol=LSE_ATOL, err_msg="lse")
    return out, lse


def build_case(case: dict):
    rng = _rng(case_id(case))
    h_q, h_kv = case["heads"]
    lengths = draw_lengths(rng, case["batch"], case["seqlen_k"], case["lengths"])
    problem = make_problem(rng, batch=case["batch"], seqlen_q=case["seqlen_q"], num_heads_q=h_q, num_heads_k=h_kv,
                           lengths=lengths, dtype=DTYPES[case["dtype"]], pad_value=case["pad"])
    return device_args(problem)


def problem_args(name, *, batch, seqlen_q, num_heads_q, num_heads_k, lengths, dtype=jnp.bfloat16, pad_value=-1):
    rng = _rng(name)
    return device_args(make_problem(rng, batch=batch, seqlen_q=seqlen_q, num_heads_q=num_heads_q,
                                    num_heads_k=num_heads_k, lengths=lengths, dtype=dtype, pad_value=pad_value))


def max_splits(num_splits) -> int:
    return int(np.diff(np.asarray(num_splits)).max())


# ---- the matrix ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", MATRIX + HEAVY, ids=[case_id(c) for c in MATRIX] + ["heavy-" + case_id(c) for c in HEAVY])
def test_matches_reference(case):
    args = build_case(case)
    out, lse = run_kernel(args, causal=case["causal"], metadata=plan(args))
    check_against_reference(args, out, lse, causal=case["causal"])


# ---- the contract's edges ------------------------------------------------------------------------

def test_kernel_path_is_the_sm90_custom_call():
    assert jfm.kernel_path() == EXPECTED_PATH
    args = problem_args("path", batch=2, seqlen_q=2, num_heads_q=16, num_heads_k=1, lengths=[100, 300])

    def step(q, k_cache, block_table, cache_seqlens):
        tile_md, num_splits = jfm.get_mla_metadata(cache_seqlens, rows_per_head_k(q, k_cache), k_cache.shape[2])
        return jfm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, D_V, tile_md, num_splits, causal=True)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the reference fallback warns
        compiled = jax.jit(step).lower(*args).compile()
        out, lse = jax.block_until_ready(compiled(*args))
    hlo = compiled.as_text()
    assert 'custom_call_target="jax_flashmla_decode"' in hlo
    assert 'custom_call_target="jax_flashmla_metadata"' in hlo
    platform = "cpu" if _ON_CPU else "gpu"
    assert {d.platform for d in out.devices()} == {platform}
    check_against_reference(args, out, lse, causal=True)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_page_boundary_lengths(dtype):
    lengths = [1, 63, 64, 65, 127, 128, 129, 191, 192, 193, 4096, 4097]
    args = problem_args(f"boundary-{dtype}", batch=len(lengths), seqlen_q=2, num_heads_q=16, num_heads_k=1,
                        lengths=lengths, dtype=DTYPES[dtype])
    for causal in (False, True):
        out, lse = run_kernel(args, causal=causal, metadata=plan(args))
        check_against_reference(args, out, lse, causal=causal)


def test_empty_rows_are_zero_with_infinite_lse():
    # Length 0: every row empty. Causal with s_q = 4: a request of length n < 4 leaves its first
    # 4 - n query tokens with no visible key.
    lengths = [0, 1, 2, 3, 4, 5, 64, 0, 200]
    args = problem_args("empty-rows", batch=len(lengths), seqlen_q=4, num_heads_q=16, num_heads_k=1, lengths=lengths)
    for causal in (False, True):
        for metadata in (plan(args), plan(args, num_sm_parts=2)):
            out, lse = run_kernel(args, causal=causal, metadata=metadata)
            out, lse = check_against_reference(args, out, lse, causal=causal)
            assert (out[0] == 0).all() and np.isposinf(lse[0]).all() and np.isposinf(lse[7]).all()
            if causal:
                assert np.isposinf(lse[1][:, :3]).all() and np.isfinite(lse[1][:, 3]).all()
                assert (out[3, 0] == 0).all() and (out[3, 1] != 0).any()


@pytest.mark.parametrize("seqlen_q", [1, 3])
def test_all_lengths_zero(seqlen_q):
    args = problem_args(f"all-zero-{seqlen_q}", batch=3, seqlen_q=seqlen_q, num_heads_q=8, num_heads_k=1,
                        lengths=[0, 0, 0])
    for causal in (False, True):
        out, lse = run_kernel(args, causal=causal, metadata=plan(args))
        assert (np.asarray(out.astype(jnp.float32)) == 0).all() and np.isposinf(np.asarray(lse)).all()


@pytest.mark.parametrize("pad_value", [-1, -(2**31), 2**31 - 1, 10**6, "num_blocks"])
def test_block_table_padding_points_nowhere(pad_value):
    lengths = [64, 65, 1, 0, 130]
    spare = 3
    num_blocks = sum(-(-n // PAGE) for n in lengths) + spare
    pad = num_blocks if pad_value == "num_blocks" else pad_value  # "num_blocks": one past the pool's end
    problem = make_problem(_rng(f"pad-{pad_value}"), batch=len(lengths), seqlen_q=1, num_heads_q=9, num_heads_k=3,
                           lengths=lengths, pad_value=pad, spare_pages=spare)
    assert problem.k_cache.shape[0] == num_blocks
    args = device_args(problem)
    for causal in (False, True):
        out, lse = run_kernel(args, causal=causal, metadata=plan(args))
        check_against_reference(args, out, lse, causal=causal)


def test_custom_softmax_scale():
    args = problem_args("scale", batch=3, seqlen_q=2, num_heads_q=32, num_heads_k=2, lengths=[40, 700, 3000])
    for scale in (0.1, 1.0):
        out, lse = run_kernel(args, causal=True, metadata=plan(args), softmax_scale=scale)
        check_against_reference(args, out, lse, causal=True, softmax_scale=scale)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_rising_and_jumping_scores(dtype):
    # The running row max moves all along each sequence and jumps on a few pages: keys are scaled up
    # with their position (score spread from 1 to 25 standard deviations) and three pages per
    # request by 3 more. So the softmax's rescaling runs on many pages, for small rises and for
    # jumps of tens of log2 units, and the split partials' maxima differ widely.
    rng = _rng(f"rising-{dtype}")
    lengths = np.array([3000, 700, 4096], np.int32)
    problem = make_problem(rng, batch=3, seqlen_q=2, num_heads_q=64, num_heads_k=1, lengths=lengths,
                           dtype=np.float32)
    k_cache = problem.k_cache  # NaN outside the requests' tokens, and it stays NaN
    for req, n in enumerate(lengths):
        pages = problem.block_table[req, : -(-int(n) // PAGE)]
        gain = 1 + 24 * np.arange(pages.size * PAGE) / n
        gain[rng.choice(pages.size, size=3, replace=False)[:, None] * PAGE + np.arange(PAGE)] *= 3
        k_cache[pages] *= gain.reshape(pages.size, PAGE, 1, 1)
    args = device_args(dataclasses.replace(problem, q=problem.q.astype(DTYPES[dtype]),
                                           k_cache=k_cache.astype(DTYPES[dtype])))
    md = plan(args, num_sm_parts=16)
    assert max_splits(md[1]) > 1
    out, lse = run_kernel(args, causal=True, metadata=md)
    check_against_reference(args, out, lse, causal=True)


# ---- metadata, jit and the split/combine path ----------------------------------------------------

@pytest.mark.parametrize("batch", [1, 7, 128, 513, 1500, 9000])
def test_device_plan_is_the_host_plan(batch):
    # The metadata kernel (one thread per run of requests, two block scans) and the host loop both
    # apply mla_contract.h's rule; they must agree bit for bit, across thread-run boundaries (batches
    # over 512), with empty requests, single pages and lengths near the int32 limit.
    from jax_flashmla import _ffi
    rng = np.random.default_rng(batch)
    kinds = rng.integers(0, 5, batch)
    seqlens = np.select([kinds == 0, kinds == 1, kinds == 2, kinds == 3],
                        [0, rng.integers(1, 65, batch), 64 * rng.integers(1, 5, batch), rng.integers(1, 20000, batch)],
                        rng.integers(1, 300000, batch)).astype(np.int32)
    seqlens[0] = 2**31 - 1 if batch == 7 else seqlens[0]
    for parts in (1, 3, 66, 132, 264):
        tile_md, num_splits = jfm.get_mla_metadata(jnp.asarray(seqlens), 16, 1, num_sm_parts=parts)
        host_md, host_splits = _ffi.schedule_tiles_host(seqlens, parts)
        np.testing.assert_array_equal(np.asarray(tile_md), host_md, err_msg=f"tile_md, parts={parts}")
        np.testing.assert_array_equal(np.asarray(num_splits), host_splits, err_msg=f"num_splits, parts={parts}")


def test_metadata_given_or_omitted_gives_identical_results():
    args = problem_args("omitted", batch=4, seqlen_q=2, num_heads_q=64, num_heads_k=1, lengths=[100, 3000, 7, 1500])
    given = run_kernel(args, causal=True, metadata=plan(args))
    omitted = run_kernel(args, causal=True, metadata=None)
    for a, b in zip(given, omitted):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    check_against_reference(args, *given, causal=True)


def test_repeated_calls_are_bitwise_identical():
    args = problem_args("repeat", batch=5, seqlen_q=1, num_heads_q=128, num_heads_k=1,
                        lengths=[5000, 17, 0, 2500, 9000])
    md = plan(args, num_sm_parts=7)
    first = run_kernel(args, causal=False, metadata=md)
    second = run_kernel(args, causal=False, metadata=md)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_metadata_reused_across_layers_under_jit():
    # A decode step: plan once, then two "layers" with different queries and caches.
    args = problem_args("layers", batch=3, seqlen_q=2, num_heads_q=16, num_heads_k=1, lengths=[900, 33, 4000])
    q, k_cache, block_table, cache_seqlens = args
    q2 = (q.astype(jnp.float32) * -0.5 + 0.25).astype(q.dtype)
    k2 = (k_cache.astype(jnp.float32) * 0.75).astype(k_cache.dtype)  # NaN slots stay NaN

    @jax.jit
    def step(q1, q2, k1, k2, block_table, cache_seqlens):
        tile_md, num_splits = jfm.get_mla_metadata(cache_seqlens, rows_per_head_k(q1, k1), k1.shape[2])
        layer1 = jfm.flash_mla_with_kvcache(q1, k1, block_table, cache_seqlens, D_V, tile_md, num_splits, causal=True)
        layer2 = jfm.flash_mla_with_kvcache(q2, k2, block_table, cache_seqlens, D_V, tile_md, num_splits, causal=True)
        return layer1, layer2

    (out1, lse1), (out2, lse2) = jax.block_until_ready(step(q, q2, k_cache, k2, block_table, cache_seqlens))
    check_against_reference(args, out1, lse1, causal=True)
    args2 = (q2, k2, block_table, cache_seqlens)
    check_against_reference(args2, out2, lse2, causal=True)
    # The jitted step gives what single eager calls with the same plan give, bit for bit.
    md = plan(args)
    for got, alone in (((out1, lse1), run_kernel(args, causal=True, metadata=md)),
                       ((out2, lse2), run_kernel(args2, causal=True, metadata=md))):
        for a, b in zip(got, alone):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_jit_of_the_whole_step():
    args = problem_args("jit-step", batch=6, seqlen_q=1, num_heads_q=128, num_heads_k=1,
                        lengths=[4096, 1, 0, 2222, 64, 8000], dtype=jnp.float16)

    @jax.jit
    def step(q, k_cache, block_table, cache_seqlens):
        md = jfm.get_mla_metadata(cache_seqlens, rows_per_head_k(q, k_cache), k_cache.shape[2])
        return jfm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, D_V, *md)

    out, lse = jax.block_until_ready(step(*args))
    check_against_reference(args, out, lse, causal=False)
    eager = run_kernel(args, causal=False, metadata=plan(args))
    for a, b in zip((out, lse), eager):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("num_sm_parts", [1, 3, 8, 264])
def test_few_or_many_sm_parts_split_and_combine(num_sm_parts):
    # Long ragged requests on few parts: requests split across parts, so the combine pass runs;
    # many parts: requests spread over many small splits.
    lengths = [6000, 5, 0, 3000, 9000, 64]
    args = problem_args(f"parts-{num_sm_parts}", batch=len(lengths), seqlen_q=2, num_heads_q=64, num_heads_k=1,
                        lengths=lengths)
    md = plan(args, num_sm_parts=num_sm_parts)
    assert md[0].shape[0] == num_sm_parts
    if num_sm_parts > 1:
        assert max_splits(md[1]) > 1, "the plan must split some request for this test to mean anything"
    for causal in (False, True):
        out, lse = run_kernel(args, causal=causal, metadata=md)
        check_against_reference(args, out, lse, causal=causal)


@pytest.mark.parametrize("seqlen_q,num_heads_q", [(1, 128), (2, 16)])
def test_one_very_long_sequence(seqlen_q, num_heads_q):
    # b = 1 over 128K tokens: the default plan splits the request over every part.
    args = problem_args(f"long-{seqlen_q}-{num_heads_q}", batch=1, seqlen_q=seqlen_q, num_heads_q=num_heads_q,
                        num_heads_k=1, lengths=[131072 - 37])
    md = plan(args)
    assert max_splits(md[1]) > 8
    out, lse = run_kernel(args, causal=True, metadata=md)
    check_against_reference(args, out, lse, causal=True)


# ---- non-finite input and negative lengths -------------------------------------------------------

def _nan_exactly_in(out, lse, nan_rows):
    """out and lse are NaN in every element of the rows nan_rows ([b, s_q, h_q] bool) and nowhere else."""
    lse_rows = lse.transpose(0, 2, 1)
    assert np.isnan(out[nan_rows]).all() and np.isnan(lse_rows[nan_rows]).all()
    assert not np.isnan(out[~nan_rows]).any() and not np.isnan(lse_rows[~nan_rows]).any()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("num_sm_parts", [None, 7])
def test_non_finite_q_gives_nan_rows(value, num_sm_parts):
    # Rows in both warpgroups' halves of a 64-row tile and in a second tile; with 7 parts request 0
    # is split, so the combine kernel sees NaN pieces.
    rng = _rng(f"non-finite-q-{value}-{num_sm_parts}")
    problem = make_problem(rng, batch=3, seqlen_q=2, num_heads_q=64, num_heads_k=1, lengths=[3000, 5, 700])
    clean = device_args(problem)
    metadata = plan(clean, num_sm_parts)
    if num_sm_parts == 7:
        assert np.diff(np.asarray(metadata[1]))[0] > 1
    clean_out, clean_lse = run_kernel(clean, causal=True, metadata=metadata)
    nan_rows = np.zeros(problem.q.shape[:3], bool)
    for b, s, h in [(0, 0, 3), (0, 1, 40), (2, 0, 63)]:
        problem.q[b, s, h, 100] = value
        nan_rows[b, s, h] = True
    args = device_args(problem)
    out, lse = run_kernel(args, causal=True, metadata=metadata)
    out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
    _nan_exactly_in(out, lse, nan_rows)
    ref_out, ref_lse = reference_f32(*args, softmax_scale=_contract.check_softmax_scale(None), causal=True)
    _nan_exactly_in(np.asarray(ref_out), np.asarray(ref_lse), nan_rows)
    # The other rows are untouched: bit for bit the clean call's.
    clean_out, clean_lse = np.asarray(clean_out.astype(jnp.float32)), np.asarray(clean_lse)
    np.testing.assert_array_equal(out[~nan_rows], clean_out[~nan_rows])
    np.testing.assert_array_equal(lse.transpose(0, 2, 1)[~nan_rows], clean_lse.transpose(0, 2, 1)[~nan_rows])


@pytest.mark.parametrize("signs", ["mixed", "negative"])
@pytest.mark.parametrize("num_sm_parts", [None, 5])
def test_overflowing_scale_gives_nan_rows(signs, num_sm_parts):
    # softmax_scale = 1e38 takes the scaled scores past the float range ("mixed": each row's max to
    # +inf, as every row sees over 100 keys; "negative": all to -inf). Rows with a visible key are
    # NaN; rows without one (length 0) stay out 0, lse +inf.
    rng = _rng(f"scale-overflow-{signs}-{num_sm_parts}")
    problem = make_problem(rng, batch=3, seqlen_q=3, num_heads_q=16, num_heads_k=1, lengths=[2000, 0, 130])
    if signs == "negative":
        problem.q[...] = -np.abs(problem.q)
        problem.k_cache[...] = np.abs(problem.k_cache)  # NaN slots stay NaN
    args = device_args(problem)
    metadata = plan(args, num_sm_parts)
    if num_sm_parts == 5:
        assert np.diff(np.asarray(metadata[1]))[0] > 1
    out, lse = run_kernel(args, causal=True, metadata=metadata, softmax_scale=1e38)
    out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
    has_key = np.asarray(_reference.visible_key_limit(args[3], 3, True)) > 0  # [b, s_q]
    nan_rows = np.broadcast_to(has_key[:, :, None], problem.q.shape[:3])
    _nan_exactly_in(out, lse, nan_rows)
    assert (out[~nan_rows] == 0).all() and np.isposinf(lse.transpose(0, 2, 1)[~nan_rows]).all()
    ref_out, ref_lse = reference_f32(*args, softmax_scale=1e38, causal=True)
    _nan_exactly_in(np.asarray(ref_out), np.asarray(ref_lse), nan_rows)


@pytest.mark.skipif(_ON_CPU, reason="the CPU path rejects negative lengths (test_cpu_decode.py)")
def test_negative_length_counts_as_zero():
    # The kernels cannot report an error: a negative length gives the rows of an empty request.
    args = problem_args("negative-length", batch=3, seqlen_q=2, num_heads_q=16, num_heads_k=1, lengths=[0, 300, 0])
    negative = args[:3] + (jnp.asarray([-5, 300, -2**31], jnp.int32),)
    for num_sm_parts in (None, 2):
        expected = run_kernel(args, causal=True, metadata=plan(args, num_sm_parts))
        out, lse = run_kernel(negative, causal=True, metadata=plan(negative, num_sm_parts))
        np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(expected[0].astype(jnp.float32)))
        np.testing.assert_array_equal(np.asarray(lse), np.asarray(expected[1]))
        check_against_reference(args, *expected, causal=True)
