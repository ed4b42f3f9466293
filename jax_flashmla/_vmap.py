"""Pieces the ops' batching rules share: JAX's marker of an unmapped operand, the mapped size, and an
operand with its mapped axis first."""

from __future__ import annotations

import jax.numpy as jnp

NOT_MAPPED = None  # JAX's marker of an operand without a mapped axis


def mapped_size(args, dims) -> int:
    """The size of the mapped axis (that of the first operand that has one)."""
    return next(x.shape[d] for x, d in zip(args, dims) if d is not NOT_MAPPED)


def moved(x, bdim, size):
    """x with its mapped axis first, broadcast to `size` members when it is not mapped."""
    if bdim is NOT_MAPPED:
        return jnp.broadcast_to(x, (size,) + x.shape)
    return jnp.moveaxis(x, bdim, 0)
