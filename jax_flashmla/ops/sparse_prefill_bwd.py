"""The sparse prefill's backward: memory-bounded pure JAX, for the custom VJP of flash_mla_sparse_fwd.

    sparse_prefill_vjp_bwd(q, kv, indices, topk_length, attn_sink, out, lse, d_out, *, sm_scale, d_v,
                           d_lse=None, chunk_bytes=CHUNK_BYTES, q_chunk=None, topk_chunk=None,
                           dkv_dtype=None)
      -> (dq [s_q, h_q, d_qk] in q's dtype, dkv [s_kv, 1, d_qk] in kv's dtype (or dkv_dtype),
          d_sink [h_q] float32, or None when attn_sink is None)

Operands, in the unbatched layout of the forward: q [s_q, h_q, d_qk]; kv [s_kv, 1, d_qk]; indices
int32 [s_q, 1, topk] (an entry is valid when 0 <= id < s_kv and its position is below the row's
topk_length; -1 and every other id are not); topk_length int32 [s_q] or None (values past topk count as
topk, negative ones as 0); attn_sink float32 [h_q] or None; out [s_q, h_q, d_v] and lse float32
[s_q, h_q] (natural log, +inf on a row with no valid entry) as the forward returned them; d_out
[s_q, h_q, d_v], the cotangent of out. d_lse (float32 [s_q, h_q] or None for zero) is the cotangent of
lse; the forward's max_logits has none (its derivative is not defined at ties; treat it as constant).

The math, per query row (token s, head h), over its valid entries t with rows k_t = kv[id_t] and
v_t = k_t[:d_v] (a slot named twice in a row is two entries):
  P_t   = exp(sm_scale * q.k_t - lse)                  (recomputed from the saved lse)
  o     = sum_t P_t v_t                                 (the output before the sink)
  sig   = sigmoid(lse - sink)   (1 without a sink)      out = sig * o
Writing g = sig * d_out and D = sum_v(g * out) (= sig * sum_v(d_out * out)):
  dS_t  = P_t * (g.v_t - D + d_lse)
  dq    = sm_scale * sum_t dS_t k_t
  dkv[id_t] += sm_scale * dS_t q  (all d_qk channels)  +  P_t g  (the first d_v channels)
  d_sink = -sum_s (1 - sig) * sum_v(d_out * out)
The sink enters twice: it scales the cotangent of o by sig, and through sig's dependence on lse it
adds (1 - sig) * sum_v(d_out * out) to lse's cotangent; together they give the D above, so with a
sink D is not the plain sum_v(d_out * o) of flash attention. The sink leaves lse itself unchanged.

Memory: nothing of size [s_q, h_q, topk] or [s_q, s_kv] exists at once. A lax.fori_loop walks the
query tokens q_chunk at a time, and inside it a second one walks each chunk's entries topk_chunk at a
time; a step holds its rows of kv and the [q_chunk, h_q, topk_chunk] scores (float32), and
scatter-adds its rows of dkv into one float32 [s_kv, d_qk] accumulator (the result's size); dq is
written chunk by chunk in q's dtype; nothing is padded, and only a step's slices are converted to
float32 (XLA's CPU backend, which computes bf16 in float32, may still keep float32 copies of bf16
operands: sizes of the operands, not of the scores). Unless
given, the chunk sizes come from a byte budget (`chunk_bytes`, CHUNK_BYTES by default): all of topk
per step if one query token fits in it, else the largest topk chunk that does; then as many tokens as
fit. A last chunk that would run past s_q (or topk) starts earlier instead, its overlap with the
chunk before masked out. Everything is accumulated in float32 (matmuls at HIGHEST precision),
whatever the input dtypes; dq and dkv are rounded once, at the end, to q's and kv's dtypes.

Invalid entries contribute nothing and never index out of bounds: their ids are clamped for the
gather, their rows masked to zero, and their dkv rows dropped by the scatter, so NaN in kv rows no
valid entry names never reaches a result. A row with no valid entry (lse +inf) gets zero gradients
and adds nothing to d_sink, whatever its d_out. NaN in q, in d_out, or in a kv row that a valid entry
reads propagates to the gradients that depend on it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK_BYTES = 256 << 20  # working set of one step: small next to an accelerator, big enough to batch


def chunk_sizes(s_q: int, h_q: int, topk: int, d_qk: int, kv_itemsize: int, chunk_bytes: int = CHUNK_BYTES,
                q_chunk: int | None = None, topk_chunk: int | None = None) -> tuple[int, int]:
    """(query tokens, topk entries) per step of the backward, for a step's working set of about
    `chunk_bytes`; a chunk size given explicitly is kept (limited to s_q or topk)."""
    # One (token, entry) pair holds its kv row (input dtype, then float32), its dkv row (float32)
    # and h_q float32 numbers in each of the scores, P, dP and dS.
    per_entry = d_qk * kv_itemsize + 2 * 4 * d_qk + 4 * 4 * h_q
    if topk_chunk is None:
        topk_chunk = max(1, chunk_bytes // per_entry)
    topk_chunk = max(1, min(int(topk_chunk), topk))
    if q_chunk is None:
        q_chunk = max(1, chunk_bytes // (per_entry * topk_chunk))
    q_chunk = max(1, min(int(q_chunk), s_q))
    return q_chunk, topk_chunk


def row_factors(s_kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse=None):
    """The backward's per-row factors, float32 [s_q, h_q]: sig (the factor of g = sig * d_out) and
    delta = D - d_lse, both 0 on a row with no valid entry; and d_sink [h_q] (None without a sink).
    Shared by the pure-JAX backward and the SM90 kernel's pre-step, so both use the same numbers."""
    f32 = jnp.float32
    s_q, topk = indices.shape[0], indices.shape[-1]
    ids = indices.reshape(s_q, topk).astype(jnp.int32)
    lengths = (jnp.full((s_q,), topk, jnp.int32) if topk_length is None
               else topk_length.reshape(s_q).astype(jnp.int32))
    position = jnp.arange(topk, dtype=jnp.int32)
    has_entry = jnp.any((ids >= 0) & (ids < s_kv) & (position[None, :] < lengths[:, None]), axis=-1)[:, None]
    dout_out = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)  # sum_v(d_out * out), [s_q, h_q]
    lse = lse.astype(f32)
    if attn_sink is not None:
        sig = jax.nn.sigmoid(lse - attn_sink.astype(f32)[None, :])
        d_sink = jnp.sum(jnp.where(has_entry, -(1.0 - sig) * dout_out, 0.0), axis=0)
        delta = sig * dout_out
    else:
        d_sink = None
        sig = jnp.ones_like(lse)
        delta = dout_out
    if d_lse is not None:
        delta = delta - d_lse.astype(f32)
    return jnp.where(has_entry, sig, 0.0), jnp.where(has_entry, delta, 0.0), d_sink


def sparse_prefill_vjp_bwd(q, kv, indices, topk_length, attn_sink, out, lse, d_out, *, sm_scale, d_v,
                           d_lse=None, chunk_bytes: int = CHUNK_BYTES, q_chunk: int | None = None,
                           topk_chunk: int | None = None, dkv_dtype=None):
    """(dq, dkv, d_sink) of the sparse prefill at (q, kv, attn_sink), given its out and lse and the
    cotangent d_out (and d_lse of lse, None for zero). See the module docstring for the layout, the
    math and the memory bound; chunk_bytes, q_chunk and topk_chunk choose the step sizes only (the
    result does not depend on them beyond float32 rounding of the order of sums). dkv_dtype (kv's
    dtype when None) is the dtype dkv is returned in: float32 keeps partial sums unrounded."""
    s_q, h_q, d_qk = q.shape
    s_kv = kv.shape[0]
    topk = indices.shape[-1]
    if not 0 < d_v <= d_qk:
        raise ValueError(f"d_v: expected 1..{d_qk}, got {d_v}")
    if kv.ndim != 3 or kv.shape[1:] != (1, d_qk):
        raise ValueError(f"kv: expected shape [s_kv, 1, {d_qk}], got {kv.shape}")
    if indices.shape != (s_q, 1, topk):
        raise ValueError(f"indices: expected shape [{s_q}, 1, topk], got {indices.shape}")
    for name, x, shape in (("out", out, (s_q, h_q, d_v)), ("lse", lse, (s_q, h_q)),
                           ("d_out", d_out, (s_q, h_q, d_v))):
        if x.shape != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(x.shape)}")
    if topk_length is not None and topk_length.shape != (s_q,):
        raise ValueError(f"topk_length: expected shape {[s_q]}, got {list(topk_length.shape)}")
    if attn_sink is not None and attn_sink.shape != (h_q,):
        raise ValueError(f"attn_sink: expected shape {[h_q]}, got {list(attn_sink.shape)}")
    if d_lse is not None and d_lse.shape != (s_q, h_q):
        raise ValueError(f"d_lse: expected shape {[s_q, h_q]}, got {list(d_lse.shape)}")

    f32 = jnp.float32
    hi = jax.lax.Precision.HIGHEST
    if s_q == 0 or topk == 0:  # nothing attends to anything
        d_sink = None if attn_sink is None else jnp.zeros_like(attn_sink, dtype=f32)
        return jnp.zeros_like(q), jnp.zeros_like(kv, dtype=dkv_dtype), d_sink
    cq, ck = chunk_sizes(s_q, h_q, topk, d_qk, jnp.dtype(kv.dtype).itemsize, chunk_bytes, q_chunk, topk_chunk)
    n_q, n_k = -(-s_q // cq), -(-topk // ck)

    ids = indices.reshape(s_q, topk).astype(jnp.int32)
    lengths = (jnp.full((s_q,), topk, jnp.int32) if topk_length is None
               else topk_length.reshape(s_q).astype(jnp.int32))
    sig, delta, d_sink = row_factors(s_kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse)
    lse = lse.astype(f32)
    rows = kv.reshape(s_kv, d_qk)

    # Chunk i covers tokens [start, start + cq) with start = min(i * cq, s_q - cq): the last chunk
    # overlaps the one before instead of running past s_q, and its tokens below i * cq (done before)
    # count as having no entries, so they add exact zeros. Entry chunks do the same along topk.
    def token_step(i, carry):
        dq, dkv = carry
        t0 = jnp.minimum(i * cq, s_q - cq)
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, t0, cq, axis=0)
        q_c = take(q).astype(f32)  # [cq, h_q, d_qk]
        g_c = take(sig)[..., None] * take(d_out).astype(f32)  # [cq, h_q, d_v]
        delta_c, lse_c, ids_c, len_c = take(delta), take(lse), take(ids), take(lengths)
        fresh = t0 + jnp.arange(cq, dtype=jnp.int32) >= i * cq  # [cq]

        def entry_step(j, carry):
            dq_c, dkv = carry
            e0 = jnp.minimum(j * ck, topk - ck)
            ids_k = jax.lax.dynamic_slice_in_dim(ids_c, e0, ck, axis=1)  # [cq, ck]
            pos = e0 + jnp.arange(ck, dtype=jnp.int32)
            ok = ((ids_k >= 0) & (ids_k < s_kv) & (pos[None, :] < len_c[:, None]) & (pos >= j * ck)[None, :]
                  & fresh[:, None])
            k = jnp.take(rows, jnp.where(ok, ids_k, 0), axis=0)  # clamped, then masked
            k = jnp.where(ok[..., None], k.astype(f32), 0.0)  # [cq, ck, d_qk]
            scores = jnp.einsum("chd,ctd->cht", q_c, k, precision=hi) * sm_scale
            p = jnp.where(ok[:, None, :], jnp.exp(scores - lse_c[..., None]), 0.0)
            dp = jnp.einsum("chv,ctv->cht", g_c, k[..., :d_v], precision=hi)
            ds = jnp.where(ok[:, None, :], p * (dp - delta_c[..., None]), 0.0) * sm_scale
            dq_c = dq_c + jnp.einsum("cht,ctd->chd", ds, k, precision=hi)
            dk = jnp.einsum("cht,chd->ctd", ds, q_c, precision=hi)
            dk = dk.at[..., :d_v].add(jnp.einsum("cht,chv->ctv", p, g_c, precision=hi))
            # Invalid entries point past the end and are dropped (jnp would wrap -1 to the last row).
            target = jnp.where(ok, ids_k, s_kv).reshape(cq * ck)
            dkv = dkv.at[target].add(dk.reshape(cq * ck, d_qk), mode="drop")
            return dq_c, dkv

        dq_c, dkv = jax.lax.fori_loop(0, n_k, entry_step, (jnp.zeros_like(q_c) + zero, dkv))
        # Rows done before get exact zeros here; dq keeps q's dtype (one rounding per element).
        dq = jax.lax.dynamic_update_slice_in_dim(dq, take(dq) + dq_c.astype(q.dtype), t0, axis=0)
        return dq, dkv

    # Inside shard_map a carry must vary over the same mesh axes as the step's results: start the
    # carries from a zero that varies like every operand.
    zero = sum(jnp.zeros_like(x, dtype=f32, shape=()) for x in (q, kv, ids, d_out, delta, lse, sig))
    dq0 = jnp.zeros_like(q) + zero.astype(q.dtype)
    dkv0 = jnp.zeros((s_kv, d_qk), f32) + zero
    dq, dkv = jax.lax.fori_loop(0, n_q, token_step, (dq0, dkv0))
    return dq, dkv.reshape(s_kv, 1, d_qk).astype(kv.dtype if dkv_dtype is None else dkv_dtype), d_sink
