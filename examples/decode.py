"""One MLA decode step through jax_flashmla, checked against the pure-JAX reference.

Runs on whatever JAX's default backend is: the C++ CPU handler without a GPU, the SM90 kernel on a
Hopper GPU. Usage: python3 examples/decode.py [--batch 4] [--seqlen 1000] [--heads 16] [--seqlen-q 1]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_flashmla as jfm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="requests (b)")
    parser.add_argument("--seqlen", type=int, default=1000, help="mean cache length")
    parser.add_argument("--heads", type=int, default=16, help="h_q (h_kv = 1)")
    parser.add_argument("--seqlen-q", type=int, default=1, help="query tokens per request (s_q)")
    parser.add_argument("--iters", type=int, default=5, help="timed calls after the warm-up")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.normal(args.seqlen, args.seqlen / 2, args.batch), args.seqlen_q, None).astype(np.int32)
    pages = -(-lengths // jfm.PAGE_SIZE)
    max_pages = int(pages.max())
    # Every request owns max_pages pages, handed out in shuffled order, like a real page pool.
    block_table = rng.permutation(args.batch * max_pages).astype(np.int32).reshape(args.batch, max_pages)
    k_cache = jnp.asarray(rng.standard_normal((args.batch * max_pages, jfm.PAGE_SIZE, 1, jfm.HEAD_DIM)), jnp.bfloat16)
    q = jnp.asarray(rng.standard_normal((args.batch, args.seqlen_q, args.heads, jfm.HEAD_DIM)), jnp.bfloat16)
    cache_seqlens = jnp.asarray(lengths)

    @jax.jit
    def decode(q, k_cache, block_table, cache_seqlens):
        tile_md, num_splits = jfm.get_mla_metadata(cache_seqlens, args.seqlen_q * args.heads, 1)
        return jfm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, tile_md, num_splits,
                                          causal=True)

    out, lse = jax.block_until_ready(decode(q, k_cache, block_table, cache_seqlens))
    start = time.perf_counter()
    for _ in range(args.iters):
        out, lse = decode(q, k_cache, block_table, cache_seqlens)
    jax.block_until_ready(out)
    elapsed = (time.perf_counter() - start) / args.iters

    ref_out, ref_lse = jax.jit(jfm.mla_decode_reference, static_argnums=(4, 5, 6))(
        q, k_cache, block_table, cache_seqlens, 512, None, True)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out.astype(jnp.float32))))
    lse_err = float(jnp.max(jnp.abs(lse - ref_lse) / jnp.abs(ref_lse)))
    print(f"backend {jax.default_backend()} | path {jfm.kernel_path()} | batch {args.batch} | "
          f"lengths {lengths.min()}..{lengths.max()} | h_q {args.heads} | s_q {args.seqlen_q}")
    print(f"out {tuple(out.shape)} {out.dtype}, lse {tuple(lse.shape)} {lse.dtype}")
    print(f"max |out - reference| = {err:.2e}, max relative lse error = {lse_err:.2e}")
    print(f"decode step (metadata + decode + combine): {elapsed * 1e3:.2f} ms")
    if not (err < 2e-2 and lse_err < 1e-4):
        raise SystemExit("mismatch against the reference")


if __name__ == "__main__":
    main()
