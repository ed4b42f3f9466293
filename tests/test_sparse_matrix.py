"""FlashMLA's sparse decode correctness matrix (its tests/test_flash_mla_sparse_decoding.py), scaled to a
CPU: the public call (the CPU handler) against the pure-JAX reference over the dequantised pools, with
FlashMLA's tolerances, on problems built as FlashMLA builds them (sparse_cases.flashmla_case).

FlashMLA's matrix crosses (cache length, topk, page size) in {(512, 64, 2), (512, 64, 64), (512, 64,
69), (1024, 576, 2), (1024, 576, 61), (2046, 2048, 2), (2046, 2048, 64), (2046, 2048, 576)} with batch
4/74/321, s_q 1/3, h_q 64/128, both formats, an extra pool (MODEL1) drawn from the same list, topk
lengths on either pool, and corner cases over (512, 64, 61) and (650, 576, 53): every index invalid,
requests with no cache, the sink off. All of it is tens of thousands of cases on a GPU; here every
value of every axis appears at least once for each format, the pairs that change what the kernel
does (format with every axis, topk with page size, the sink with the corner cases) appear together,
and h_q also takes 1, 8, 16 and 32. Batches of 74 and 321 run at topk 64 over shorter caches with
few heads. test_matrix_covers_flashmla_axes checks that coverage on the case list itself.

The scale is FlashMLA's test's, d_qk ** -0.55. DeepSeek-V3.2's shape (h_q 128, s_q 2, topk 2048) and
V4's first (topk 128 + extra 512) are in test_sparse_decode.py; V4's widest (h_q 128, topk 128 +
extra 1024 over pages of 2, extra topk lengths) is here."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sparse_cases import CachePool, check, flashmla_case
from sparse_matrix_cases import A, B, C, CASES, D, D_QK, E, F, G, H, I, J, case_id

@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matches_reference(rng, case):
    fmt, batch, seqlen_q, heads, main, extra, varlen, zero, invalid, sink = case
    kwargs = flashmla_case(rng, fmt, batch=batch, seqlen_q=seqlen_q, heads=heads, main=main, extra=extra,
                           varlen=varlen, zero_lengths=zero, all_invalid=invalid, sink=sink)
    out, lse = check(kwargs, softmax_scale=D_QK[fmt] ** -0.55)
    out, lse = np.asarray(out, np.float32), np.asarray(lse)
    if invalid:  # every row empty: out 0 and lse +inf everywhere, whatever the sink
        assert np.all(out == 0) and np.all(lse == np.inf)
    else:  # the problem is not degenerate: rows attend to something, and nothing read a NaN slot
        assert np.isfinite(lse).any() and not np.isnan(out).any() and not np.isnan(lse).any()
    if zero and not invalid:  # request 0 has no cache: all its rows are empty
        assert np.all(out[0] == 0) and np.all(lse[0] == np.inf)


def test_deepseek_v4_widest_shape(rng):
    """FlashMLA's MODEL1 CONFIG4: h_q 128, s_q 2, topk 128 over pages of 256 plus 1024 extra tokens
    over pages of 2 with extra topk lengths."""
    kwargs = flashmla_case(rng, "model1", batch=2, seqlen_q=2, heads=128, main=CachePool(2048, 128, 256),
                           extra=CachePool(2048, 1024, 2, True))
    check(kwargs, softmax_scale=512 ** -0.55)


def test_matrix_covers_flashmla_axes():
    """Every value of every axis of FlashMLA's matrix, per format; its (topk, page size) pairs per
    format, in the main or the extra pool; the sink with and without each corner case."""
    flashmla_pairs = {(p.topk, p.page_size) for p in (A, B, C, D, E, F, G, H, I, J)}
    for fmt in D_QK:
        cases = [c for c in CASES if c[0] == fmt]
        pools = [p for c in cases for p in (c[4], c[5]) if p is not None]
        assert {c[1] for c in cases} == {4, 74, 321}, fmt
        assert {c[2] for c in cases} == {1, 3}, fmt
        assert {c[3] for c in cases} == {1, 8, 16, 32, 64, 128}, fmt
        assert {p.page_size for p in pools} == {2, 53, 61, 64, 69, 576}, fmt
        assert {p.topk for p in pools} == {64, 576, 2048}, fmt
        assert {(p.topk, p.page_size) for p in pools} >= flashmla_pairs, fmt
        assert {c[5] is None for c in cases} == {True, False}, fmt
        assert {c[4].lengths for c in cases} == {True, False}, fmt
        assert any(c[5] is not None and c[5].lengths for c in cases), fmt
        for axis in (6, 7, 8, 9):  # varlen, zero lengths, all invalid, sink
            assert {c[axis] for c in cases} == {True, False}, (fmt, axis)
        # The large batches cross both query lengths.
        assert {(c[1], c[2]) for c in cases if c[1] > 4} & {(74, 1), (74, 3), (321, 1), (321, 3)}, fmt
    for corner in (7, 8):
        assert {(c[corner], c[9]) for c in CASES} == set(itertools.product((True, False), repeat=2)), corner
    assert {(c[1], c[2]) for c in CASES} == set(itertools.product((4, 74, 321), (1, 3)))
