"""Random decode problems for the transformation tests (small shapes, CPU-friendly), the devices a
multi-device test takes, and the comparison of second derivatives against the reference's."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import jax.numpy as jnp
import pytest

from jax_flashmla import PAGE_SIZE, testing


def make_case(seed, *, batch=2, seqlen_q=1, heads_q=4, heads_k=1, lens=None, max_blocks=3, num_blocks=None,
              dtype=jnp.bfloat16, shards=1, poison=True):
    """A decode problem (jax_flashmla.testing) as device arrays, its page ids a random permutation of
    the pool; lengths uniform in [1, max_blocks * 64] unless given.

    With shards > 1 the pool splits into `shards` equal slices and request i's pages are drawn from
    slice i // (batch // shards), as the data-parallel layout requires. Slots past each length hold
    NaN and block-table entries past ceil(len / 64) hold garbage when `poison` is set; without it every
    column holds a page of the request's own, with random values throughout (room to append).
    """
    rng = np.random.default_rng(seed)
    if lens is None:
        lens = rng.integers(1, max_blocks * PAGE_SIZE + 1, size=batch)
    per_shard = batch // shards
    if num_blocks is None:
        num_blocks = shards * (per_shard * max_blocks + 1)
    layout = dict(pages=max_blocks, pad=-1) if not poison else dict(pad=testing.GARBAGE)
    problem = testing.make_problem(rng, batch=batch, seqlen_q=seqlen_q, num_heads_q=heads_q, num_heads_k=heads_k,
                                   lengths=lens, dtype=np.float32, poison=poison, max_blocks=max_blocks,
                                   num_blocks=num_blocks, shards=shards, **layout)
    return (jnp.asarray(problem.q, dtype), jnp.asarray(problem.k_cache, dtype), jnp.asarray(problem.block_table),
            jnp.asarray(problem.cache_seqlens))


def devices_or_skip(n):
    """The first n devices (tests/conftest.py gives the CPU 8); skips the test when this backend has
    fewer (a 2-GPU machine runs the tests of 2 devices)."""
    if len(jax.devices()) < n:
        pytest.skip(f"needs {n} devices, this backend has {len(jax.devices())}")
    return jax.devices()[:n]


def mesh_of(shape, names):
    """A mesh of the first prod(shape) devices (skips the test when there are fewer)."""
    from jax.sharding import Mesh

    return Mesh(np.array(devices_or_skip(int(np.prod(shape)))).reshape(shape), names)


def place(mesh, call, specs):
    """A call's arrays (a dict) on `mesh`, each with its spec in `specs` (replicated when not named)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    return {k: None if v is None else jax.device_put(v, NamedSharding(mesh, specs.get(k, P())))
            for k, v in call.items()}


@contextlib.contextmanager
def gspmd_partitioner():
    """Shardy off inside the block, so XLA's GSPMD propagation calls the custom_partitioning callbacks."""
    if not hasattr(jax.config, "jax_use_shardy_partitioner"):
        pytest.skip("this JAX has no GSPMD propagation to fall back on")
    previous = jax.config.jax_use_shardy_partitioner
    try:
        jax.config.update("jax_use_shardy_partitioner", False)
    except Exception as e:  # noqa: BLE001  (a JAX that only keeps the flag for compatibility)
        pytest.skip(f"cannot turn Shardy off: {e}")
    try:
        yield
    finally:
        jax.config.update("jax_use_shardy_partitioner", previous)


def assert_within_eps(got, want, dtype, *, l2, max_elem=None):
    """`got` has no NaN and is within `l2` times dtype's epsilon of `want` in relative L2 error (and,
    when given, within `max_elem` eps of want's largest magnitude in every element). The bound of
    the second-derivative tests: their 16-bit tangents are rounded once more than the reference's."""
    eps = float(jnp.finfo(dtype).eps)
    g, w = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert not np.isnan(g).any()
    assert np.linalg.norm(g - w) <= l2 * eps * np.linalg.norm(w), np.linalg.norm(g - w) / np.linalg.norm(w) / eps
    if max_elem is not None:
        assert np.abs(g - w).max() <= max_elem * eps * np.abs(w).max(), np.abs(g - w).max() / np.abs(w).max() / eps
