"""Shared test helpers: the decode problem of jax_flashmla.testing with the tests' defaults, the
random stream of each test, and the output comparison against the reference.

The transformation tests need several devices; on the CPU that means asking XLA for 8 host devices
before JAX initializes its backend, so the flag is set here, first (a no-op if already set)."""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from jax_flashmla import _contract, testing
from jax_flashmla.reference import visible_key_limit
from jax_flashmla.testing import Problem  # noqa: F401  (the type the tests' helpers take)


def make_problem(rng, *, batch, seqlen_q, num_heads_q, num_heads_k, lengths, dtype=jnp.bfloat16,
                 spare_pages=3, pad_value=-1) -> Problem:
    """A decode problem (jax_flashmla.testing) whose pages are shuffled across the pool, whose unused
    cache slots (past each length, and `spare_pages` whole unused pages) hold NaN, and whose
    block-table padding is `pad_value`, with one column of pure padding."""
    pages = testing.pages_for(lengths)
    return testing.make_problem(rng, batch=batch, seqlen_q=seqlen_q, num_heads_q=num_heads_q,
                                num_heads_k=num_heads_k, lengths=lengths, dtype=dtype, spare_pages=spare_pages,
                                pad=pad_value, max_blocks=max(int(pages.max(initial=0)), 1) + 1)


def cos_diff(x, y) -> float:
    """FlashMLA's closeness measure, 1 - 2 sum(xy) / sum(x^2 + y^2), in float64."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    denom = float((x * x + y * y).sum())
    if denom == 0.0:  # both all zero (every row empty): identical
        return 0.0
    return 1.0 - 2.0 * float((x * y).sum()) / denom


@pytest.fixture
def rng(request):
    # A fresh stream per test, the same on every run and machine: seeded from a checksum of the
    # test's name (Python's hash() of a string changes from process to process).
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def weighted_abs_values(problem: Problem, *, causal: bool, softmax_scale: float | None = None) -> np.ndarray:
    """sum_i p_i |v_i| for every output element, in float64: the scale of the terms each output sums.

    Two fp32 implementations that add those terms in different orders differ by a small multiple of
    fp32's unit roundoff times this scale, however much the terms cancel; an element that cancels to
    near zero can therefore differ by many of its own ulps while being right to fp32 precision."""
    q = np.asarray(problem.q, np.float64)
    k_cache = np.asarray(problem.k_cache, np.float64)
    b, s_q, h_q, d = q.shape
    h_kv = k_cache.shape[2]
    scale = _contract.check_softmax_scale(softmax_scale)
    limits = np.asarray(visible_key_limit(np.asarray(problem.cache_seqlens), s_q, causal))  # [b, s_q]
    out = np.zeros((b, s_q, h_q, _contract.HEAD_DIM_V))
    for i, n in enumerate(int(x) for x in problem.cache_seqlens):
        if n == 0:
            continue
        pages = problem.block_table[i, : -(-n // _contract.PAGE_SIZE)]
        keys = k_cache[pages].reshape(-1, h_kv, d)[:n]  # [n, h_kv, d]
        for s in range(s_q):
            limit = int(limits[i, s])
            if limit <= 0:
                continue
            for h in range(h_q):
                head_keys = keys[:limit, h // (h_q // h_kv)]
                scores = head_keys @ q[i, s, h] * scale
                p = np.exp(scores - scores.max())
                out[i, s, h] = (p / p.sum()) @ np.abs(head_keys[:, : _contract.HEAD_DIM_V])
    return out


def assert_output_close(out, ref_out, problem: Problem, *, causal: bool, softmax_scale: float | None = None):
    """Two fp32-accumulating implementations, each rounded once to the output dtype: at most one
    output ulp apart, plus fp32 reassociation noise on cancelled elements. That noise was measured
    at up to ~25 u (u = 2**-24) times `weighted_abs_values`; the bound allows 128 u. A wrong mask,
    scale or page is off by orders of magnitude more (1e-3 and up, relative)."""
    out, ref_out = np.asarray(out, np.float64), np.asarray(ref_out, np.float64)
    ulp = 2.0 ** -7 if problem.q.dtype == jnp.bfloat16 else 2.0 ** -10
    noise = 128 * 2.0 ** -24 * weighted_abs_values(problem, causal=causal, softmax_scale=softmax_scale)
    excess = np.abs(out - ref_out) - (ulp * np.abs(ref_out) + noise)
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 0, (f"output differs at {worst}: {out[worst]} vs reference {ref_out[worst]} "
                               f"(allowed {ulp * abs(ref_out[worst]) + noise[worst]:.3g})")
