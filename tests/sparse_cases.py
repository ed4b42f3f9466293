"""Shared helpers of the sparse decode tests: index, length and sink generators over the contract's
hard cases (-1 and out-of-pool ids, empty rows, repeated ids); FlashMLA's own way of building a sparse
decode problem (per-request cache lengths over shuffled pages, distinct positions per query row, -1
padding, NaN in every unread slot); the public call, the reference it is checked against, and the
element-wise comparison with FlashMLA's abs-or-rel rule and a cosine bound."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import jax_flashmla as fm
from jax_flashmla import _ext, kv_formats
from conftest import cos_diff

# FlashMLA's checks of its sparse decode kernels (tests/test_flash_mla_sparse_decoding.py): out within
# abs 1e-3 or rel 2.01/128 with a cosine difference under 5e-6; lse within abs 1e-6 or rel 8.01/65536.
OUT_TOL = dict(atol=1e-3, rtol=2.01 / 128, cos_tol=5e-6)
LSE_TOL = dict(atol=1e-6, rtol=8.01 / 65536)

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


# ---- the public call, its reference and the check --------------------------------------------------

def run(kwargs, softmax_scale=None):
    """flash_mla_with_kvcache in sparse mode over the FP8 pools of ``kwargs`` (a dict of its arguments)."""
    kwargs = dict(kwargs)
    return fm.flash_mla_with_kvcache(kwargs.pop("q"), kwargs.pop("k_cache"), None, None, softmax_scale=softmax_scale,
                                     is_fp8_kvcache=True, **kwargs)


def reference(kwargs, softmax_scale=None):
    """The reference over the pools dequantised to bfloat16 (the values the handler computes with),
    jitted (one compilation per shape instead of one per operation)."""
    given = {name: value for name, value in kwargs.items() if value is not None}
    fmt = kv_formats.kv_cache_format_of(given["k_cache"])
    return _reference_jit(given, fmt, softmax_scale)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _reference_jit(kwargs, fmt, softmax_scale):
    kwargs = dict(kwargs)
    for name in ("k_cache", "extra_k_cache"):
        if name in kwargs:
            kwargs[name] = kv_formats.dequantize_kv_cache(kwargs[name], fmt)
    return fm.sparse_decode_reference(**kwargs, softmax_scale=softmax_scale)


def check(kwargs, softmax_scale=None):
    """The call's shapes and dtypes, then out and lse against the reference with FlashMLA's tolerances."""
    out, lse = run(kwargs, softmax_scale)
    b, s_q, h_q, _ = kwargs["q"].shape
    assert out.shape == (b, s_q, h_q, 512) and out.dtype == jnp.bfloat16
    assert lse.shape == (b, h_q, s_q) and lse.dtype == jnp.float32
    want_out, want_lse = reference(kwargs, softmax_scale)
    assert_close("lse", lse, want_lse, **LSE_TOL)
    assert_close("out", out, want_out, **OUT_TOL)
    return out, lse


# ---- FlashMLA's problems ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CachePool:
    """One pool of a FlashMLA-style problem: requests' cache lengths around ``seqlen`` tokens, rows of
    ``topk`` slots, pages of ``page_size`` tokens, and whether a topk_length goes with it."""

    seqlen: int
    topk: int
    page_size: int
    lengths: bool = False


def request_lengths(rng, batch, seqlen, *, seqlen_q, varlen, zero_lengths):
    """Tokens in each request's cache, as FlashMLA's test draws them: all ``seqlen``, or (varlen)
    normal around it with deviation seqlen / 2, at least seqlen_q; with zero_lengths about half are
    0 (request 0 always, the last request never)."""
    lens = np.full(batch, seqlen, np.int64)
    if varlen:
        lens = np.maximum(rng.normal(seqlen, seqlen / 2, batch), seqlen_q).astype(np.int64)
    if zero_lengths:
        zero = rng.standard_normal(batch) > 0
        zero[0], zero[-1] = True, False
        lens[zero] = 0
    return lens


def flashmla_pool(rng, fmt, spec: CachePool, *, batch, seqlen_q, varlen, zero_lengths, all_invalid):
    """(FP8 pool, indices [b, s_q, topk] int32, topk_length [b] int32 or None), built as FlashMLA's
    test builds them. Each request owns ceil(len / page_size) pages, handed out in shuffled order
    from a pool that has one spare page; every query row names min(topk, len) distinct token
    positions of its request in random order, then -1 up to topk (all -1 with all_invalid). Each
    slot that no entry before topk_length names holds NaN before quantisation, so a read of it would
    show; entries past topk_length name valid slots that must not be read."""
    page = spec.page_size
    lens = request_lengths(rng, batch, spec.seqlen, seqlen_q=seqlen_q, varlen=varlen, zero_lengths=zero_lengths)
    pages = -(-lens // page)
    num_blocks = int(pages.sum()) + 1
    order = rng.permutation(num_blocks)
    table = np.zeros((batch, max(int(pages.max()), 1)), np.int64)  # request i's pages, in order
    for i, start in enumerate(np.cumsum(pages) - pages):
        table[i, :pages[i]] = order[start:start + pages[i]]
    # Distinct positions per row in random order: the topk smallest of random keys, those of
    # positions past the request's length made infinite (so they come last and become -1).
    width = max(int(lens.max()), spec.topk)
    keys = rng.random((batch, seqlen_q, width))
    keys[np.broadcast_to(np.arange(width)[None, None, :] >= lens[:, None, None], keys.shape)] = np.inf
    pos = np.argsort(keys, axis=-1, kind="stable")[..., :spec.topk]
    valid = (pos < lens[:, None, None]) & (not all_invalid)
    slots = np.take_along_axis(table[:, None, :], np.minimum(pos // page, table.shape[1] - 1), -1) * page + pos % page
    ids = np.where(valid, slots, -1)
    lengths = make_lengths(rng, batch, spec.topk) if spec.lengths else None
    read = ids >= 0
    if lengths is not None:
        read &= np.arange(spec.topk)[None, None, :] < lengths[:, None, None]
    kv = np.full((num_blocks * page, fmt.d_qk), np.nan, np.float32)
    read_slots = np.unique(ids[read])
    kv[read_slots] = np.clip(rng.standard_normal((read_slots.size, fmt.d_qk), np.float32) / 10, -1, 1)
    kv = jnp.asarray(kv.reshape(num_blocks, page, 1, fmt.d_qk), jnp.bfloat16)
    pool = kv_formats.quantize_kv_cache(kv, fmt)
    return pool, jnp.asarray(ids, jnp.int32), None if lengths is None else jnp.asarray(lengths)


def flashmla_case(rng, fmt_name, *, batch, seqlen_q, heads, main: CachePool, extra: CachePool | None = None,
                  varlen=True, zero_lengths=False, all_invalid=False, sink=True):
    """kwargs of flash_mla_with_kvcache in sparse mode for one case of FlashMLA's sparse decode test:
    q normal clipped to [-1, 1], pools as flashmla_pool, FlashMLA's sinks (about a third +inf and a
    third -inf). zero_lengths and all_invalid apply to both pools, as in FlashMLA's test."""
    fmt = kv_formats.kv_cache_format(fmt_name)
    q = jnp.asarray(np.clip(rng.standard_normal((batch, seqlen_q, heads, fmt.d_qk)), -1, 1), jnp.bfloat16)
    flags = dict(batch=batch, seqlen_q=seqlen_q, varlen=varlen, zero_lengths=zero_lengths, all_invalid=all_invalid)
    pool, ids, lengths = flashmla_pool(rng, fmt, main, **flags)
    kwargs = dict(q=q, k_cache=pool, indices=ids, topk_length=lengths,
                  attn_sink=jnp.asarray(make_sink(rng, heads)) if sink else None)
    if extra is not None:
        pool, ids, lengths = flashmla_pool(rng, fmt, extra, **flags)
        kwargs.update(extra_k_cache=pool, extra_indices_in_kvcache=ids, extra_topk_length=lengths)
    return kwargs


def poison_unused(pool, fmt, page_size, used):
    """The pool with every byte of each slot outside `used` set to 0xFF: NaN latent values, NaN
    scales and NaN RoPE values, so a read of an unused slot shows in the result."""
    raw = np.array(jax.lax.bitcast_convert_type(pool, jnp.uint8) if pool.dtype != jnp.uint8 else pool)
    pages = raw.reshape(raw.shape[0], -1)
    for slot in np.flatnonzero(~used):
        page, token = divmod(int(slot), page_size)
        at = _ext.kv_offsets(fmt.index, page_size, token)
        pages[page, at["record"]:at["record"] + fmt.record_bytes] = 0xFF
        if fmt.scale_record_bytes:
            pages[page, at["scale"]:at["scale"] + fmt.scale_record_bytes] = 0xFF
    out = jnp.asarray(pages.reshape(raw.shape))
    return out if pool.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(out, pool.dtype)


# ---- problems of the decode tests (CPU and GPU) ---------------------------------------------------------

def used_mask(num_slots, ids, lengths):
    limit = ids.shape[2] if lengths is None else np.asarray(lengths)[:, None, None]
    ok = (ids >= 0) & (ids < num_slots) & (np.arange(ids.shape[2])[None, None, :] < limit)
    used = np.zeros(num_slots, bool)
    used[ids[ok]] = True
    return used


def make_pool(rng, fmt, *, batch, seqlen_q, page, topk, lengths, invalid, empty_rows, num_blocks=None,
              dtype=jnp.float8_e4m3fn):
    """(FP8 pool with NaN in unread slots, ids, topk_length or None)."""
    if num_blocks is None:
        num_blocks = max(-(-topk // page) + 2, 3)
    lens = make_lengths(rng, batch, topk) if lengths else None
    ids = make_indices(rng, batch=batch, seqlen_q=seqlen_q, topk=topk, num_slots=num_blocks * page,
                       invalid=invalid, empty_rows=empty_rows, topk_length=lens)
    # Past topk_length make_indices leaves garbage, out-of-pool ids included: never read.
    kv = np.clip(rng.standard_normal((num_blocks, page, 1, fmt.d_qk)) / 10, -1, 1)
    pool = kv_formats.quantize_kv_cache(jnp.asarray(kv, jnp.bfloat16), fmt, dtype)
    pool = poison_unused(pool, fmt, page, used_mask(num_blocks * page, ids, lens))
    return pool, jnp.asarray(ids), None if lens is None else jnp.asarray(lens)


def make_case(rng, fmt_name, *, batch, seqlen_q, heads, page, topk, lengths=False, sink=False, extra=None,
              invalid=0.2, empty_rows=0, dtype=jnp.float8_e4m3fn):
    """kwargs of flash_mla_with_kvcache in sparse mode. extra: (page, topk, lengths) of a second pool."""
    fmt = kv_formats.kv_cache_format(fmt_name)
    q = jnp.asarray(np.clip(rng.standard_normal((batch, seqlen_q, heads, fmt.d_qk)), -1, 1), jnp.bfloat16)
    pool, ids, lens = make_pool(rng, fmt, batch=batch, seqlen_q=seqlen_q, page=page, topk=topk, lengths=lengths,
                                invalid=invalid, empty_rows=empty_rows, dtype=dtype)
    kwargs = dict(q=q, k_cache=pool, indices=ids, topk_length=lens,
                  attn_sink=jnp.asarray(make_sink(rng, heads)) if sink else None)
    if extra is not None:
        e_page, e_topk, e_lengths = extra
        e_pool, e_ids, e_lens = make_pool(rng, fmt, batch=batch, seqlen_q=seqlen_q, page=e_page, topk=e_topk,
                                          lengths=e_lengths, invalid=invalid, empty_rows=empty_rows, dtype=dtype)
        kwargs.update(extra_k_cache=e_pool, extra_indices_in_kvcache=e_ids, extra_topk_length=e_lens)
    return kwargs
