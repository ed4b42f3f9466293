"""Serve a small DeepSeek-style MLA decoder with a paged KV cache and continuous batching.

A random-initialised decoder (jax_flashmla.nn.MLADecoder) serves a queue of requests with prompts of
different lengths in a fixed number of batch slots. Each iteration admits waiting requests into free
slots (one prefill call, naive attention, which also stores the prompts' 576-wide latent+rope entries
in the page pools), runs one decode step for every active slot (weight absorption, attention through
jax_flashmla's kernel over the paged cache) and retires finished requests, returning their pages to
the free stack for the next requests.

Who does what: the host decides admissions and retirements (it knows every request's length, so it
also budgets pages: a request is admitted only when the pool can hold its longest possible length);
the device does everything else in three jitted functions that donate the cache (prefill, decode,
release), with fixed shapes so each compiles once.

Check: every --check-every decode steps, the decode logits of the active requests are compared with
the same model run without cache in float32 (the naive path, weights absorbed nowhere) over each
request's whole token history. The bound is self-calibrated: the decode path may differ from the
float32 oracle by at most --tolerance-factor (2) times what the plain bfloat16 naive path differs on
the same tokens, i.e. paging, absorption and the kernel may not add error beyond bfloat16 rounding.
A wrong page, position or absorption shows up as an error of the order of the logits themselves.

Usage: python3 examples/serve.py [--layers 2 --batch 4 --requests 8 --new-tokens 16]
Runs unchanged on a GPU; see the README ("Examples") for real-size flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_flashmla as jfm
from jax_flashmla import nn


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--batch", type=int, default=4, help="batch slots (concurrent requests)")
    p.add_argument("--requests", type=int, default=8, help="requests served in total")
    p.add_argument("--prompt-len", type=int, default=96, help="longest prompt; prompts are 1/4..1 of it")
    p.add_argument("--new-tokens", type=int, default=16, help="most tokens generated per request (1/2..1 of it)")
    p.add_argument("--dim", type=int, default=256, help="model width")
    p.add_argument("--heads", type=int, default=8, help="attention heads (h_q)")
    p.add_argument("--q-lora-rank", type=int, default=128, help="0: no query compression")
    p.add_argument("--nope-dim", type=int, default=64, help="qk_nope_head_dim")
    p.add_argument("--v-dim", type=int, default=64, help="v_head_dim")
    p.add_argument("--mlp-dim", type=int, default=512, help="hidden width of each layer's MLP")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    p.add_argument("--prefill-batch", type=int, default=0,
                   help="prompts per prefill call (naive attention holds [rows, heads, len, len] scores); 0: --batch")
    p.add_argument("--pages", type=int, default=0, help="page pool size per layer; 0: enough for a full batch")
    p.add_argument("--check-every", type=int, default=4, help="check decode logits every N steps (0: never)")
    p.add_argument("--check-rows", type=int, default=4, help="requests checked per check step")
    p.add_argument("--tolerance-factor", type=float, default=2.0,
                   help="decode logits may differ from the float32 naive path by this times the bfloat16 naive path's error")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, prompts and lengths")
    return p.parse_args(argv)


def build_model(args):
    attn = nn.MLAConfig(dim=args.dim, num_heads=args.heads, q_lora_rank=args.q_lora_rank,
                        qk_nope_head_dim=args.nope_dim, v_head_dim=args.v_dim)
    cfg = nn.DecoderConfig(vocab_size=args.vocab, num_layers=args.layers, mlp_dim=args.mlp_dim, attention=attn)
    return nn.MLADecoder(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(args.seed))


@dataclasses.dataclass
class Request:
    rid: int
    prompt: list
    max_new: int
    generated: list = dataclasses.field(default_factory=list)

    @property
    def tokens(self):
        return self.prompt + self.generated


def make_requests(args, rng):
    lo_p, lo_n = max(1, args.prompt_len // 4), max(1, args.new_tokens // 2)
    return [Request(i, rng.integers(0, args.vocab, int(rng.integers(lo_p, args.prompt_len + 1))).tolist(),
                    int(rng.integers(lo_n, args.new_tokens + 1))) for i in range(args.requests)]


def run(args) -> dict:
    """Serves args.requests requests; returns the summary (also printed by main)."""
    rng = np.random.default_rng(args.seed)
    model = build_model(args)
    graphdef, state = nnx.split(model)
    requests = make_requests(args, rng)
    max_len = args.prompt_len + args.new_tokens
    pages_per_seq = nn.pages_needed(max_len)
    num_pages = args.pages or args.batch * pages_per_seq
    if num_pages < pages_per_seq:
        raise SystemExit(f"--pages {num_pages} cannot hold one request of {max_len} tokens")
    cache = nn.init_cache(args.layers, num_pages, args.batch, pages_per_seq, jnp.bfloat16)
    prefill_len = nn.pages_needed(args.prompt_len) * jfm.PAGE_SIZE  # one padded prompt shape
    prefill_rows = min(args.prefill_batch or args.batch, args.batch)
    oracle_len = pages_per_seq * jfm.PAGE_SIZE

    def prefill(state, cache, tokens, lens, slots):
        logits, cache = nnx.merge(graphdef, state).prefill(tokens, lens, slots, cache)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache

    def decode(state, cache, tokens, active):
        logits, cache = nnx.merge(graphdef, state).decode(tokens, active, cache)
        return jnp.argmax(logits, -1).astype(jnp.int32), logits, cache

    @jax.jit
    def oracle(state, tokens, lens):
        """Logits at position lens-1 of the naive path in float32 and in bfloat16."""
        model = nnx.merge(graphdef, state)
        take = lambda logits: jnp.take_along_axis(logits, (lens - 1)[:, None, None], axis=1)[:, 0]
        with jax.default_matmul_precision("highest"):  # true float32 (GPUs would use TF32)
            ref = take(model.naive(tokens, jnp.float32)[0])
        return ref, take(model.naive(tokens)[0])

    def check(logits, rows):
        """(max |decode - f32 naive|, max |bf16 naive - f32 naive|, the first over max |f32 naive|) for
        the requests in batch rows `rows`, over their whole histories (padded to one shape)."""
        hist = np.zeros((args.check_rows, oracle_len), np.int32)
        hlen = np.ones(args.check_rows, np.int32)
        reqs = [slots[i] for i in rows]
        for j, r in enumerate(reqs):
            hist[j, :len(r.tokens)], hlen[j] = r.tokens, len(r.tokens)
        ref, naive_bf16 = (np.asarray(a)[:len(reqs)] for a in oracle(state, hist, hlen))
        err = float(np.abs(np.asarray(logits)[rows] - ref).max())
        return err, float(np.abs(naive_bf16 - ref).max()), err / float(np.abs(ref).max())

    prefill = jax.jit(prefill, donate_argnums=1)  # donated: the pools are updated in place
    decode = jax.jit(decode, donate_argnums=1)
    release = jax.jit(nn.release, donate_argnums=0)

    slots: list[Request | None] = [None] * args.batch
    queue = list(requests)
    pages_reserved = 0  # host-side budget: pages the admitted requests may grow into
    pages_handed_out = 0
    step_times, step_tokens, prefill_time, prefill_tokens = [], [], 0.0, 0
    max_abs = max_rel = max_floor = 0.0
    checks, ok = 0, True
    step = 0
    t_start = time.perf_counter()
    while queue or any(slots):
        # Admit waiting requests into free slots while the page budget allows.
        admitted = []
        for i in range(args.batch):
            if slots[i] is None and queue:
                need = nn.pages_needed(len(queue[0].prompt) + queue[0].max_new)
                if pages_reserved + need > num_pages:
                    break
                pages_reserved += need
                slots[i] = queue.pop(0)
                admitted.append(i)
        for chunk in range(0, len(admitted), prefill_rows):
            group = admitted[chunk:chunk + prefill_rows]
            tokens = np.zeros((prefill_rows, prefill_len), np.int32)
            lens = np.ones(prefill_rows, np.int32)
            slot_ids = np.full(prefill_rows, args.batch, np.int32)  # args.batch: a padding row
            for row, i in enumerate(group):
                tokens[row, :len(slots[i].prompt)] = slots[i].prompt
                lens[row], slot_ids[row] = len(slots[i].prompt), i
            t0 = time.perf_counter()
            first, cache = prefill(state, cache, tokens, lens, slot_ids)
            first = np.asarray(first)
            prefill_time += time.perf_counter() - t0
            for row, i in enumerate(group):
                slots[i].generated.append(int(first[row]))
                prefill_tokens += len(slots[i].prompt)
                pages_handed_out += nn.pages_needed(len(slots[i].prompt))

        # One decode step for every slot whose request still wants tokens.
        active = np.array([r is not None and len(r.generated) < r.max_new for r in slots])
        if active.any():
            last = np.array([r.tokens[-1] if r is not None else 0 for r in slots], np.int32)
            t0 = time.perf_counter()
            nxt, logits, cache = decode(state, cache, last, active)
            nxt = np.asarray(nxt)
            step_times.append(time.perf_counter() - t0)
            rows = [i for i in range(args.batch) if active[i]]
            if args.check_every and step % args.check_every == 0:
                err, floor, rel = check(logits, rows[:args.check_rows])
                max_abs, max_floor, max_rel = max(max_abs, err), max(max_floor, floor), max(max_rel, rel)
                ok &= err <= args.tolerance_factor * floor
                checks += 1
            for i in rows:
                n = len(slots[i].tokens)  # the cache now holds n tokens, n - 1 before this step
                pages_handed_out += nn.pages_needed(n) - nn.pages_needed(n - 1)
                slots[i].generated.append(int(nxt[i]))
            step_tokens.append(len(rows))
            step += 1

        # Retire finished requests: their pages go back on the free stack.
        done = np.array([r is not None and len(r.generated) >= r.max_new for r in slots])
        if done.any():
            cache = release(cache, done)
            for i in np.flatnonzero(done):
                pages_reserved -= nn.pages_needed(len(slots[i].prompt) + slots[i].max_new)
                slots[i] = None
    wall = time.perf_counter() - t_start

    # Every page must be back on the free stack, each exactly once.
    num_free = int(cache.num_free)
    free_set = sorted(np.asarray(cache.free_pages)[:num_free].tolist())
    pages_ok = num_free == num_pages and free_set == list(range(num_pages))
    # The first decode step compiles; latency and throughput count the steps after it.
    timed = slice(1, None) if len(step_times) > 1 else slice(None)
    result = dict(
        backend=jax.default_backend(), kernel_path=jfm.kernel_path(), requests=len(requests), slots=args.batch,
        layers=args.layers, decode_steps=len(step_times), decode_tokens=sum(step_tokens),
        tokens_per_s=sum(step_tokens[timed]) / max(sum(step_times[timed]), 1e-9),
        step_ms_median=1e3 * float(np.median(step_times[timed])) if step_times else 0.0,
        prefill_tokens=prefill_tokens, prefill_s=prefill_time, wall_s=wall,
        num_pages=num_pages, pages_handed_out=pages_handed_out, pages_returned=pages_ok,
        checks=checks, max_abs_diff=max_abs, max_rel_diff=max_rel, bf16_naive_abs_diff=max_floor,
        decode_matches=bool(ok and checks > 0), generated={r.rid: r.generated for r in requests},
    )
    result["ok"] = result["decode_matches"] and pages_ok
    return result


def summary(r) -> str:
    return (f"serve: {r['backend']} ({r['kernel_path']}) | {r['requests']} requests, {r['slots']} slots, "
            f"{r['layers']} layers | {r['decode_tokens']} tokens in {r['decode_steps']} decode steps: "
            f"{r['tokens_per_s']:.1f} tokens/s, {r['step_ms_median']:.2f} ms/step (median) | "
            f"pages: pool {r['num_pages']}, {r['pages_handed_out']} handed out, "
            f"{'all returned' if r['pages_returned'] else 'NOT all returned'} | decode vs naive f32 "
            f"({r['checks']} checks): max abs {r['max_abs_diff']:.3e}, max rel {r['max_rel_diff']:.3e} "
            f"(bf16 naive: {r['bf16_naive_abs_diff']:.3e}) {'OK' if r['ok'] else 'FAILED'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    r = run(args)
    print(f"prefill: {r['prefill_tokens']} prompt tokens in {r['prefill_s']:.2f} s (first call compiles); "
          f"wall {r['wall_s']:.1f} s")
    print(summary(r))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
