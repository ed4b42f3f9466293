"""Shared helpers of the sparse decode tests: index, length and sink generators over the contract's
hard cases (-1 and out-of-pool ids, empty rows, repeated ids), and the element-wise comparison with
FlashMLA's abs-or-rel rule and a cosine bound."""

from __future__ import annotations

import numpy as np

from conftest import cos_diff

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1

GARBAGE_IDS = (-1, -7, INT32_MIN, INT32_MAX)  # besides slots at and past the pool's end


def make_indices(rng, *, batch, seqlen_q, topk, num_slots, invalid=0.0, empty_rows=0, duplicates=False,
                 topk_length=None):
    """Slot ids [b, s_q, topk]: distinct random slots per row (or drawn with repetition), a share
    `invalid` of them -1, `empty_rows` rows all -1, and garbage (out-of-pool ids, or slots nothing
    else uses, which get NaN) in every entry past the request's topk_length."""
    ids = np.empty((batch, seqlen_q, topk), np.int64)
    for i in range(batch):
        for s in range(seqlen_q):
            ids[i, s] = rng.choice(num_slots, size=topk, replace=duplicates or topk > num_slots)
    ids[rng.random(ids.shape) < invalid] = -1
    rows = rng.permutation(batch * seqlen_q)[:empty_rows]
    ids.reshape(batch * seqlen_q, topk)[rows] = -1
    if topk_length is not None:
        past = np.arange(topk)[None, None, :] >= np.asarray(topk_length)[:, None, None]
        garbage = np.array(GARBAGE_IDS + (num_slots, num_slots + 5))
        pick = rng.integers(0, 2, ids.shape) == 0
        ids = np.where(past & pick, garbage[rng.integers(0, len(garbage), ids.shape)],
                       np.where(past, rng.integers(0, num_slots, ids.shape), ids))
    return ids.astype(np.int32)


def make_lengths(rng, batch, topk):
    """topk_length per request: 0 and topk among them, the rest uniform in [0, topk]."""
    lens = rng.integers(0, topk + 1, batch)
    lens[0] = 0
    lens[-1] = topk
    return lens.astype(np.int32)


def make_sink(rng, h_q):
    """FlashMLA's test sinks: normal, about a third of heads +inf and a third -inf."""
    sink = rng.standard_normal(h_q).astype(np.float32)
    pick = rng.standard_normal(h_q)
    sink[pick > 0.5] = np.inf
    sink[pick < -0.5] = -np.inf
    return sink


def assert_close(name, got, want, *, atol, rtol, cos_tol=None):
    """FlashMLA's closeness rule: inf, -inf and NaN at the same places; every other element within
    atol or within rtol of the wanted value; and, when given, a cosine difference under cos_tol."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    for kind, mask in (("+inf", np.isposinf), ("-inf", np.isneginf), ("NaN", np.isnan)):
        np.testing.assert_array_equal(mask(got), mask(want), err_msg=f"{name}: {kind} at different places")
    finite = np.isfinite(want)
    err = np.abs(got[finite] - want[finite])
    rel = err / (np.abs(want[finite]) + 1e-6)
    bad = (err >= atol) & (rel >= rtol)
    assert not bad.any(), (f"{name}: {bad.sum()} of {bad.size} elements off; worst abs {err.max():.3g}, "
                           f"worst rel {rel[err >= atol].max():.3g}")
    if cos_tol is not None:
        assert abs(cos_diff(got[finite], want[finite])) < cos_tol, (name, cos_diff(got[finite], want[finite]))
