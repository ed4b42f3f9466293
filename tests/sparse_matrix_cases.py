"""The case list of FlashMLA's sparse decode correctness matrix scaled to a CPU (test_sparse_matrix.py
says how it was chosen), shared by the CPU test and the GPU test of the kernel."""

from __future__ import annotations

from sparse_cases import CachePool

D_QK = {"v32": 576, "model1": 512}

# FlashMLA's (cache length, topk, page size) triples: correctness, then corner cases.
A, B, C = CachePool(512, 64, 2), CachePool(512, 64, 64), CachePool(512, 64, 69)
D, E = CachePool(1024, 576, 2), CachePool(1024, 576, 61)
F, G, H = CachePool(2046, 2048, 2), CachePool(2046, 2048, 64), CachePool(2046, 2048, 576)
I, J = CachePool(512, 64, 61), CachePool(650, 576, 53)


def lengths(pool: CachePool, seqlen: int | None = None) -> CachePool:
    """The pool with a topk_length (and, given, a shorter cache for the large batches)."""
    return CachePool(seqlen or pool.seqlen, pool.topk, pool.page_size, True)


def shorter(pool: CachePool, seqlen: int) -> CachePool:
    return CachePool(seqlen, pool.topk, pool.page_size, pool.lengths)


# format, batch, s_q, h_q, main pool, extra pool, varlen, zero_lengths, all_invalid, sink
CASES = [
    # V3.2 (FlashMLA: no extra pool, no topk_length, the sink always on outside the corner cases).
    ("v32", 4, 1, 64, A, None, True, False, False, True),
    ("v32", 4, 3, 128, B, None, False, False, False, True),
    ("v32", 74, 1, 8, shorter(C, 256), None, True, False, False, True),
    ("v32", 4, 3, 16, D, None, True, False, False, True),
    ("v32", 4, 1, 32, E, None, False, False, False, True),
    ("v32", 4, 1, 1, F, None, True, False, False, True),
    ("v32", 4, 3, 8, G, None, True, False, False, True),
    ("v32", 4, 1, 64, H, None, True, False, False, True),
    ("v32", 321, 3, 1, shorter(I, 96), None, True, False, False, True),
    ("v32", 4, 3, 64, I, None, True, False, True, True),
    ("v32", 4, 3, 128, J, None, True, True, False, False),
    ("v32", 74, 3, 16, shorter(I, 128), None, False, True, False, True),
    # Beyond FlashMLA's V3.2 cases: both pools and both lengths with d_qk 576.
    ("v32", 4, 3, 32, lengths(D), lengths(B), True, False, False, True),
    # MODEL1 / DeepSeek-V4.
    ("model1", 4, 3, 64, lengths(A), None, True, False, False, True),
    ("model1", 4, 1, 128, B, lengths(E), True, False, False, True),
    ("model1", 74, 3, 16, lengths(C, 256), shorter(A, 128), True, False, False, True),
    ("model1", 4, 1, 32, lengths(D), lengths(H), True, False, False, True),
    ("model1", 4, 3, 1, E, G, True, False, False, True),
    ("model1", 4, 1, 8, lengths(F), None, True, False, False, True),
    ("model1", 4, 3, 16, G, lengths(B), True, False, False, True),
    ("model1", 4, 1, 64, H, None, False, False, False, True),
    ("model1", 321, 1, 8, lengths(B, 96), lengths(A, 96), False, False, False, True),
    ("model1", 4, 3, 128, J, lengths(I), True, True, False, True),
    ("model1", 74, 3, 32, shorter(I, 128), shorter(I, 128), True, True, True, False),
    ("model1", 4, 3, 8, lengths(I), J, True, False, True, False),
]


def _pool_id(pool: CachePool) -> str:
    return f"{pool.topk}p{pool.page_size}" + ("L" if pool.lengths else "")


def case_id(case) -> str:
    fmt, batch, seqlen_q, heads, main, extra, varlen, zero, invalid, sink = case
    flags = [name for name, on in (("var", varlen), ("zero", zero), ("invalid", invalid), ("sink", sink)) if on]
    pools = _pool_id(main) + ("" if extra is None else "+" + _pool_id(extra))
    return "-".join([fmt, f"b{batch}", f"sq{seqlen_q}", f"h{heads}", pools] + flags)
