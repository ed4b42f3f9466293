"""Shared test helpers: random decode problems with the contract's hard cases built in.

The transformation tests need several devices; on the CPU that means asking XLA for 8 host devices
before JAX initializes its backend, so the flag is set here, first (a no-op if already set)."""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jax_flashmla import _contract


@dataclasses.dataclass
class Problem:
    q: np.ndarray
    k_cache: np.ndarray
    block_table: np.ndarray
    cache_seqlens: np.ndarray

    @property
    def args(self):
        return self.q, self.k_cache, self.block_table, self.cache_seqlens


def make_problem(rng, *, batch, seqlen_q, num_heads_q, num_heads_k, lengths, dtype=jnp.bfloat16,
                 spare_pages=3, pad_value=-1) -> Problem:
    """A decode problem whose pages are shuffled across the pool, whose unused cache slots (past each
    length, and whole unused pages) hold NaN, and whose block-table padding is `pad_value`."""
    lengths = np.asarray(lengths, np.int32)
    assert lengths.shape == (batch,)
    pages_per_seq = [_contract.PAGE_SIZE and -(-int(n) // _contract.PAGE_SIZE) for n in lengths]
    max_blocks = max(max(pages_per_seq), 1) + 1  # one column of pure padding
    num_blocks = sum(pages_per_seq) + spare_pages
    k_cache = np.full((num_blocks, _contract.PAGE_SIZE, num_heads_k, _contract.HEAD_DIM), np.nan, np.float32)
    block_table = np.full((batch, max_blocks), pad_value, np.int32)
    ids = rng.permutation(num_blocks)
    next_id = 0
    for i, n_pages in enumerate(pages_per_seq):
        for j in range(n_pages):
            page = ids[next_id]
            next_id += 1
            block_table[i, j] = page
            valid = min(_contract.PAGE_SIZE, int(lengths[i]) - j * _contract.PAGE_SIZE)
            k_cache[page, :valid] = rng.standard_normal((valid, num_heads_k, _contract.HEAD_DIM))
    q = rng.standard_normal((batch, seqlen_q, num_heads_q, _contract.HEAD_DIM)).astype(np.float32)
    return Problem(q.astype(dtype), k_cache.astype(dtype), block_table, lengths)


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
    # A fresh stream per test, reproducible from the test's name.
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (2**32))
