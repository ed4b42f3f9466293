"""Problems of the sparse prefill tests (a Bazel test sees helper modules, not other test files): FlashMLA's
tolerances and scale, its invalid ids, `make_case`, which builds operands as FlashMLA's test does, and
`check`, the public call against the float32 reference with those tolerances."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jax_flashmla as fm
from jax_flashmla import reference
from sparse_cases import INT32_MAX, INT32_MIN, assert_close, make_sink

# FlashMLA's checks of its prefill kernel (tests/test_flash_mla_sparse_prefill.py): out (bf16) against
# the reference's float32 out within abs 8e-4 or rel 3.01/128 with a cosine difference under 7e-6;
# max_logits and lse within abs 1e-6 or rel 2.01/65536; inf and NaN at the same places.
OUT_TOL = dict(atol=8e-4, rtol=3.01 / 128, cos_tol=7e-6)
STAT_TOL = dict(atol=1e-6, rtol=2.01 / 65536)
SCALE = 0.5  # FlashMLA's test scale

# FlashMLA's invalid ids (its test draws them past each row's valid ones), s_kv added per case.
INVALID_IDS = (INT32_MIN, -123456, -1, 114514, 1919810, 2147480000, INT32_MAX)


def make_case(rng, *, s_q, s_kv, topk, h_q, d_qk, sink=False, lengths=False, empty_rows=0):
    """Operands of one call, built as FlashMLA's test builds them: q and kv normal / 10 plus a shared
    offset; every row of indices names min(topk, s_kv) distinct kv rows in random order, then invalid
    ids up to topk; `empty_rows` rows all invalid; FlashMLA's sinks; topk_length in [0, topk] with 0
    and topk among them. Every kv row that no valid entry reads holds NaN."""
    q = rng.standard_normal((s_q, h_q, d_qk)) / 10 + (rng.random() - 0.5) / 10
    kv = rng.standard_normal((s_kv, 1, d_qk)) / 10 + (rng.random() - 0.5) / 10
    keys = rng.random((s_q, max(s_kv, topk)))
    keys[:, s_kv:] = np.inf
    ids = np.argsort(keys, axis=-1, kind="stable")[:, :topk]
    garbage = np.array(INVALID_IDS + (s_kv, s_kv + 1))
    ids = np.where(ids >= s_kv, garbage[rng.integers(0, len(garbage), ids.shape)], ids)
    rows = rng.permutation(s_q)[:empty_rows]
    ids[rows] = garbage[rng.integers(0, len(garbage), (len(rows), topk))]
    topk_length = None
    if lengths:
        topk_length = rng.integers(0, topk + 1, s_q)
        topk_length[0], topk_length[-1] = 0, topk
    read = (ids >= 0) & (ids < s_kv)
    if topk_length is not None:
        read &= np.arange(topk)[None, :] < topk_length[:, None]
    unread = np.ones(s_kv, bool)
    unread[ids[read]] = False
    kv[unread] = np.nan
    return dict(q=jnp.asarray(q, jnp.bfloat16), kv=jnp.asarray(kv, jnp.bfloat16),
                indices=jnp.asarray(ids.reshape(s_q, 1, topk), jnp.int32),
                attn_sink=jnp.asarray(make_sink(rng, h_q)) if sink else None,
                topk_length=None if topk_length is None else jnp.asarray(topk_length, jnp.int32))


def run(case, sm_scale=SCALE):
    return fm.flash_mla_sparse_fwd(case["q"], case["kv"], case["indices"], sm_scale, attn_sink=case["attn_sink"],
                                   topk_length=case["topk_length"])


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def _reference_f32(q, kv, indices, topk_length, attn_sink, sm_scale):
    # float32 operands (the bf16 values exactly), so out stays float32, as FlashMLA's reference out.
    return reference.sparse_prefill_reference_math(q.astype(jnp.float32), kv.astype(jnp.float32), indices,
                                                   topk_length, attn_sink, sm_scale=sm_scale)


def reference_f32(case, sm_scale=SCALE):
    return _reference_f32(case["q"], case["kv"], case["indices"], case["topk_length"], case["attn_sink"],
                          sm_scale=sm_scale)


def check(case, sm_scale=SCALE):
    """Shapes and dtypes, then out, max_logits and lse against the reference with FlashMLA's tolerances."""
    out, max_logits, lse = run(case, sm_scale)
    s_q, h_q, _ = case["q"].shape
    assert out.shape == (s_q, h_q, 512) and out.dtype == jnp.bfloat16
    assert max_logits.shape == lse.shape == (s_q, h_q)
    assert max_logits.dtype == lse.dtype == jnp.float32
    want_out, want_max, want_lse = reference_f32(case, sm_scale)
    assert_close("max_logits", max_logits, want_max, **STAT_TOL)
    assert_close("lse", lse, want_lse, **STAT_TOL)
    assert_close("out", np.asarray(out, np.float32), want_out, **OUT_TOL)
    # NaN fills every kv row nobody reads: none of it may leak.
    assert not np.isnan(np.asarray(out, np.float32)).any() and not np.isnan(np.asarray(lse)).any()
    return out, max_logits, lse
