"""One sparse decode step of DeepSeek-V3.2's shape over an FP8 KV cache, checked against the pure-JAX reference.

DeepSeek Sparse Attention, as a server runs it: each request's context tokens are quantised into a
paged FP8 pool ("v32": 656 bytes a token) with jax_flashmla.write_tokens, the way new tokens are
appended (jitted, the uint8 pool donated and updated in place); an indexer picks, for every query
token, the top-k cache positions it may attend to (here a stand-in: dot products of small random
projections, causal, so query token j of a request sees its first len - s_q + j + 1 tokens);
the positions become global slot ids through the request's page table (page * page_size + offset,
-1 where a request has fewer visible tokens than topk); flash_mla_with_kvcache(..., indices=...)
attends to those tokens only.

Check: out and lse against jax_flashmla.sparse_decode_reference over the pool dequantised to
bfloat16, with FlashMLA's tolerances (out within abs 1e-3 or rel 2.01/128 and a cosine difference
under 5e-6; lse within abs 1e-6 or rel 8.01/65536; +inf at the same places).

Runs on whatever JAX's default backend is (the C++ CPU handler without a GPU). The defaults are
DeepSeek-V3.2's decode shape (h_q 128, s_q 2, topk 2048) at batch 2; --format model1 gives V4's
d_qk 512 pool (584 bytes a token) instead.
Usage: python3 examples/sparse_decode.py [--batch 2 --context 3000 --heads 128 --topk 2048]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_flashmla as jfm

OUT_TOL = (1e-3, 2.01 / 128, 5e-6)  # abs, rel, cosine difference: FlashMLA's sparse decode test
LSE_TOL = (1e-6, 8.01 / 65536)
INDEXER_DIM = 64  # width of the indexer stand-in's projections


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=2, help="requests (b)")
    parser.add_argument("--context", type=int, default=3000,
                        help="mean cache length; lengths vary from request to request (normal, deviation a half)")
    parser.add_argument("--seqlen-q", type=int, default=2, help="query tokens per request (s_q)")
    parser.add_argument("--heads", type=int, default=128, help="query heads (h_q); the cache has one")
    parser.add_argument("--topk", type=int, default=2048, help="cache tokens each query token attends to")
    parser.add_argument("--page-size", type=int, default=64, help="tokens per page of the pool (any size)")
    parser.add_argument("--format", choices=("v32", "model1"), default="v32",
                        help="pool format: v32 (d_qk 576, DeepSeek-V3.2) or model1 (d_qk 512, DeepSeek-V4)")
    parser.add_argument("--iters", type=int, default=3, help="timed calls after the warm-up")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("batch", "context", "seqlen_q", "heads", "topk", "page_size", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _within(got, want, atol, rtol):
    """Elements of got outside FlashMLA's abs-or-rel bound around want, with inf/NaN at the same places."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    same_specials = all(np.array_equal(f(got), f(want)) for f in (np.isposinf, np.isneginf, np.isnan))
    finite = np.isfinite(want) & np.isfinite(got)
    err = np.abs(got[finite] - want[finite])
    bad = (err >= atol) & (err / (np.abs(want[finite]) + 1e-6) >= rtol)
    return same_specials, int(bad.sum()), float(err.max(initial=0.0)), got[finite], want[finite]


def run(args) -> dict:
    fmt = jfm.kv_cache_format(args.format)
    rng = np.random.default_rng(args.seed)
    b, s_q, page = args.batch, args.seqlen_q, args.page_size

    # Requests and their pages: request i owns ceil(len_i / page) pages, handed out in shuffled order.
    lens = np.maximum(rng.normal(args.context, args.context / 2, b), s_q).astype(np.int64)
    pages = -(-lens // page)
    num_blocks = int(pages.sum())
    order = rng.permutation(num_blocks)
    table = np.zeros((b, int(pages.max())), np.int32)
    for i, start in enumerate(np.cumsum(pages) - pages):
        table[i, :pages[i]] = order[start:start + pages[i]]

    # The context: each token's latent + RoPE vector (a stand-in for the model's), written into an
    # empty pool at its slot, as a server appends tokens (all at once here).
    pos = np.concatenate([np.arange(n) for n in lens])
    req = np.repeat(np.arange(b), lens)
    slots = jnp.asarray(table[req, pos // page] * page + pos % page, jnp.int32)
    tokens = jnp.asarray(rng.standard_normal((len(pos), fmt.d_qk)), jnp.bfloat16)
    write = jax.jit(lambda pool, slots, tokens: jfm.write_tokens(pool, fmt, slots, tokens), donate_argnums=0)
    pool = write(jnp.zeros(fmt.pool_shape(num_blocks, page), jnp.uint8), slots, tokens)

    q = jnp.asarray(rng.standard_normal((b, s_q, args.heads, fmt.d_qk)), jnp.bfloat16)
    index_q = jnp.asarray(rng.standard_normal((b, s_q, INDEXER_DIM)), jnp.float32)
    index_k = jnp.asarray(rng.standard_normal((b, int(lens.max()), INDEXER_DIM)), jnp.float32)

    @jax.jit
    def select(index_q, index_k, table, lens):
        """The indexer stand-in: each query token's top-k visible positions, as global slots (-1: none)."""
        scores = jnp.einsum("bsd,btd->bst", index_q, index_k)
        visible = lens[:, None, None] - s_q + jnp.arange(s_q)[None, :, None] + 1  # causal
        scores = jnp.where(jnp.arange(index_k.shape[1])[None, None, :] < visible, scores, -jnp.inf)
        top, position = jax.lax.top_k(scores, min(args.topk, index_k.shape[1]))
        slot = jnp.take_along_axis(table[:, None, :], position // page, axis=-1) * page + position % page
        slot = jnp.where(jnp.isfinite(top), slot, -1)
        return jnp.pad(slot, ((0, 0), (0, 0), (0, args.topk - slot.shape[-1])), constant_values=-1)

    @jax.jit
    def decode(q, pool, indices):
        return jfm.flash_mla_with_kvcache(q, pool, None, None, is_fp8_kvcache=True, indices=indices)

    indices = select(index_q, index_k, jnp.asarray(table), jnp.asarray(lens, jnp.int32))
    out, lse = jax.block_until_ready(decode(q, pool, indices))
    start = time.perf_counter()
    for _ in range(args.iters):
        out, lse = decode(q, pool, indices)
    jax.block_until_ready(out)
    elapsed = (time.perf_counter() - start) / args.iters

    reference = jax.jit(lambda q, pool, indices: jfm.sparse_decode_reference(
        q, jfm.dequantize_kv_cache(pool, fmt), indices))
    ref_out, ref_lse = reference(q, pool, indices)
    out_specials, out_bad, out_err, got, want = _within(out, ref_out, *OUT_TOL[:2])
    cos = 1.0 - 2.0 * float((got * want).sum()) / max(float((got * got + want * want).sum()), 1e-300)
    lse_specials, lse_bad, lse_err, _, _ = _within(lse, ref_lse, *LSE_TOL)
    ids = np.asarray(indices)
    return {
        "backend": jax.default_backend(), "path": jfm.kernel_path(), "format": fmt.name, "lengths": lens,
        "page_table": table, "pool_shape": tuple(pool.shape), "pool_bytes": int(pool.size * pool.dtype.itemsize),
        "indices": ids, "unused_entries": int((ids < 0).sum()), "out_shape": tuple(out.shape),
        "lse_shape": tuple(lse.shape), "ms_per_step": elapsed * 1e3,
        "out_max_abs_diff": out_err, "out_cos_diff": cos, "lse_max_abs_diff": lse_err,
        "out_matches": out_specials and out_bad == 0 and abs(cos) < OUT_TOL[2],
        "lse_matches": lse_specials and lse_bad == 0,
        "ok": out_specials and out_bad == 0 and abs(cos) < OUT_TOL[2] and lse_specials and lse_bad == 0,
    }


def summary(r) -> str:
    b, s_q, h_q, _ = r["out_shape"]
    topk = r["indices"].shape[-1]
    return (f"sparse_decode: {r['backend']} ({r['path']}) | {r['format']} pool {r['pool_shape']} "
            f"({r['pool_bytes'] / 2 ** 20:.1f} MiB), lengths {r['lengths'].min()}..{r['lengths'].max()} | "
            f"b {b}, s_q {s_q}, h_q {h_q}, topk {topk} ({r['unused_entries']} entries -1) | "
            f"{r['ms_per_step']:.2f} ms/step | vs reference: out max abs {r['out_max_abs_diff']:.3e}, "
            f"cos diff {r['out_cos_diff']:.1e}, lse max abs {r['lse_max_abs_diff']:.3e} "
            f"{'OK' if r['ok'] else 'MISMATCH'}")


def main(argv=None) -> int:
    r = run(parse_args(argv))
    print(summary(r))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
