"""Serve a small DeepSeek-V3.2-style decoder (MLA + lightning indexer + DeepSeek Sparse Attention) from an FP8 cache with continuous batching.

A random-initialised jax_flashmla.nn.SparseMLADecoder serves a queue of requests with prompts of
different lengths in a fixed number of batch slots. In every layer a lightning indexer scores
earlier tokens with FP8 index queries and keys (sum over heads of w_h * relu(q_h . k_t)) and each
token attends only to its --topk best: prefill through flash_mla_sparse_fwd over the prompt's own
entries, decode through flash_mla_with_kvcache's sparse mode over the FP8 "v32" latent pool (656
bytes a token), the indexer's top-k positions turned into global cache slots through the block table.
The cache holds, per layer, the FP8 latent pool and the FP8 index-key pool (132 bytes a token for
128-channel keys) on the same pages, one allocator for both.

Who does what: the host admits and retires requests and budgets pages (a request is admitted only
when the pool can hold its longest possible length); the device runs three jitted functions that
donate the cache (prefill, decode, release), with fixed shapes so each compiles once.

Check: every --check-every decode steps, the decode logits of the active requests are compared with
the same model run densely, without cache, in float32, each layer's attention restricted by a mask
to exactly the positions its indexer picked for that token when it was served (prompt tokens at
prefill, later tokens at their decode step). The bound is self-calibrated: the served logits may
differ from that oracle by at most --tolerance-factor (2) times what the same masked dense run in
bfloat16 with the latent entries rounded through the FP8 format differs. A wrong slot (an index off by
one), page or position shows as an error of the order of the logits.

Timing: tokens/s and ms/step of the decode steps (the first, which compiles, not counted); the share
of a step in the indexer's logits, its top-k and the sparse attention is measured after serving by
running each of the three alone at the step's shapes (every slot at its longest context) for every
layer, against the median step (v4: the sparse attention's share only).

Config (--config): "v32" (the default) is the model above. "v4" is DeepSeek-V4-style
(jax_flashmla.nn.WindowMLADecoder): d_qk 512 over FP8 "model1" pools (584 bytes a token), no indexer;
each token reads a --window of recent tokens from the main pool plus the compressed entries of its
complete --compress-stride blocks from a second pool (the sparse decode's extra_k_cache), and a learned
attention sink per head joins every softmax. The compressor is a stand-in for V4's learned one: a
fixed-stride mean of latent entries. Its check is the same, the oracle being that model run densely
in float32 over exactly those tokens (window + compressed entries), with the sink.

Shapes (--shape): "small" (the default) is a tiny model that runs on the CPU in seconds (CI).
"v32" is DeepSeek-V3.2's attention shape: h_q 128 (or a tensor-parallel share with --heads), d_qk 576
/ d_v 512 through the FP8 "v32" pool, qk_nope 128, v_head 128, q_lora_rank 1536, an indexer of 64
heads x 128 channels, topk 2048, prompts of 4096 to 4608 tokens; with 2 layers, width 2048 and a
1024-token vocabulary so that it fits one GPU. It is meant for a GPU; on the CPU it runs only at a
reduced --prompt-len. At that length the oracle is chunked over query tokens (--oracle-chunk: never
[b, h, t, t] scores at once) and the prefill's sparse attention over query tokens (--prefill-chunk).
Options given on the command line override a shape's values.

Usage: python3 examples/serve_sparse.py [--layers 2 --batch 4 --requests 8 --topk 64]
       python3 examples/serve_sparse.py --config v4 [--window 32 --compress-stride 4]
       python3 examples/serve_sparse.py --shape v32 [--heads 32]      # on a GPU
Runs unchanged on a GPU (there the sparse ops' GPU kernels where they exist, the pure-JAX reference
otherwise); see the README ("Examples").
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_flashmla as jfm
from jax_flashmla import indexer as index_ops
from jax_flashmla import nn


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# Values a --shape sets (options given explicitly override them); "small" is the parser's defaults.
SHAPES = {
    "small": {},
    "v32": dict(heads=128, topk=2048, prompt_len=4608, min_prompt_len=4096, new_tokens=16, dim=2048,
                q_lora_rank=1536, nope_dim=128, v_dim=128, index_heads=64, index_dim=128, mlp_dim=2048,
                vocab=1024, layers=2, batch=4, requests=8, check_rows=2, oracle_chunk=128, prefill_chunk=256),
}


def _parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=tuple(SHAPES), default="small",
                   help="small: a tiny model for the CPU (CI). v32: DeepSeek-V3.2's attention shape (h_q 128, "
                        "topk 2048, prompts 4096-4608 tokens, d_qk 576 / d_v 512, indexer 64 x 128; 2 layers, "
                        "width 2048, vocabulary 1024), meant for a GPU: on the CPU only at a reduced "
                        "--prompt-len. Explicit options override the shape's values; the defaults shown are "
                        "small's")
    p.add_argument("--layers", type=_positive, default=2, help="decoder layers")
    p.add_argument("--batch", type=_positive, default=4, help="batch slots (concurrent requests)")
    p.add_argument("--requests", type=_positive, default=8, help="requests served in total")
    p.add_argument("--prompt-len", type=_positive, default=96, help="longest prompt")
    p.add_argument("--min-prompt-len", type=int, default=0, help="shortest prompt (0: a quarter of --prompt-len; at most --prompt-len)")
    p.add_argument("--new-tokens", type=_positive, default=12, help="most tokens generated per request (1/2..1 of it)")
    p.add_argument("--topk", type=_positive, default=32, help="tokens each query attends to (DeepSeek-V3.2: 2048)")
    p.add_argument("--dim", type=_positive, default=128, help="model width")
    p.add_argument("--heads", type=_positive, default=4, help="attention heads (h_q)")
    p.add_argument("--q-lora-rank", type=int, default=64, help="0: no query compression")
    p.add_argument("--nope-dim", type=_positive, default=32, help="qk_nope_head_dim")
    p.add_argument("--v-dim", type=_positive, default=32, help="v_head_dim")
    p.add_argument("--index-heads", type=_positive, default=8, help="indexer heads (DeepSeek-V3.2: 64)")
    p.add_argument("--index-dim", type=_positive, default=64, help="indexer head dim, a power of two (V3.2: 128)")
    p.add_argument("--mlp-dim", type=_positive, default=256, help="hidden width of each layer's MLP")
    p.add_argument("--vocab", type=_positive, default=512, help="vocabulary size")
    p.add_argument("--pages", type=int, default=0, help="page pool size per layer; 0: enough for a full batch")
    p.add_argument("--check-every", type=int, default=4, help="check decode logits every N steps (0: never)")
    p.add_argument("--check-rows", type=_positive, default=4, help="requests checked per check step")
    p.add_argument("--tolerance-factor", type=float, default=2.0,
                   help="decode logits may differ from the float32 masked oracle by this times the "
                        "bfloat16 + FP8-entries oracle's error")
    p.add_argument("--config", choices=("v32", "v4"), default="v32",
                   help="v32: MLA + lightning indexer top-k over a v32 FP8 pool (DeepSeek-V3.2). v4: DeepSeek-V4-style, "
                        "d_qk 512 over model1 FP8 pools, each token reading a --window of recent tokens plus the "
                        "mean-pooled entries of complete --compress-stride blocks (a second pool, the op's "
                        "extra_k_cache), with a learned attn_sink per head; no indexer (--topk and --index-* unused)")
    p.add_argument("--window", type=_positive, default=32, help="v4: recent tokens each token reads, itself included")
    p.add_argument("--compress-stride", type=_positive, default=4, help="v4: tokens mean-pooled into a compressed entry")
    p.add_argument("--oracle-chunk", type=int, default=64,
                   help="query tokens the dense oracle scores at a time (0: all at once, [b, h, t, t] scores)")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="query tokens per sparse prefill call (0: the whole prompt in one call)")
    p.add_argument("--phase-reps", type=int, default=10, help="runs of each phase when timing its share (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, prompts and lengths")
    return p


def parse_args(argv=None):
    p = _parser()
    p.set_defaults(**SHAPES[p.parse_known_args(argv)[0].shape])
    args = p.parse_args(argv)
    if args.min_prompt_len < 0:
        p.error(f"--min-prompt-len must be >= 0, got {args.min_prompt_len}")
    args.min_prompt_len = min(args.min_prompt_len, args.prompt_len)  # a reduced --prompt-len wins
    return args


def build_model(args):
    if args.config == "v4":
        attn = nn.MLAConfig(dim=args.dim, num_heads=args.heads, q_lora_rank=args.q_lora_rank,
                            qk_nope_head_dim=args.nope_dim, v_head_dim=args.v_dim, kv_lora_rank=nn.KV_LORA_RANK_V4,
                            attn_sink=True)
        cfg = nn.WindowDecoderConfig(vocab_size=args.vocab, num_layers=args.layers, mlp_dim=args.mlp_dim,
                                     attention=attn, window=args.window, compress_stride=args.compress_stride)
        return nn.WindowMLADecoder(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(args.seed))
    attn = nn.MLAConfig(dim=args.dim, num_heads=args.heads, q_lora_rank=args.q_lora_rank,
                        qk_nope_head_dim=args.nope_dim, v_head_dim=args.v_dim)
    index = nn.IndexerConfig(dim=args.dim, q_lora_rank=args.q_lora_rank, num_heads=args.index_heads,
                             head_dim=args.index_dim, rope_dim=min(nn.ROPE_DIM, args.index_dim // 2), topk=args.topk)
    cfg = nn.SparseDecoderConfig(vocab_size=args.vocab, num_layers=args.layers, mlp_dim=args.mlp_dim,
                                 attention=attn, indexer=index)
    return nn.SparseMLADecoder(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(args.seed))


@dataclasses.dataclass
class Request:
    rid: int
    prompt: list
    max_new: int
    generated: list = dataclasses.field(default_factory=list)
    picks: list = dataclasses.field(default_factory=list)  # per token fed to the model: [layers, topk] positions

    @property
    def tokens(self):
        return self.prompt + self.generated


def make_requests(args, rng):
    lo_p, lo_n = max(1, args.min_prompt_len or args.prompt_len // 4), max(1, args.new_tokens // 2)
    return [Request(i, rng.integers(0, args.vocab, int(rng.integers(lo_p, args.prompt_len + 1))).tolist(),
                    int(rng.integers(lo_n, args.new_tokens + 1))) for i in range(args.requests)]


def _timed(fn, *xs, reps):
    jax.block_until_ready(fn(*xs))  # compiles
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*xs))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def phase_times(args, cache, reps: int) -> dict:
    """Seconds per decode step in the indexer's logits, its top-k and the sparse attention, each run
    alone at the step's shapes (every slot at its longest context, random queries) for every layer."""
    slots, max_pages = cache.block_table.shape
    width = max_pages * jfm.PAGE_SIZE
    rng = np.random.default_rng(args.seed + 1)
    table = jnp.asarray(np.arange(slots * max_pages).reshape(slots, max_pages) % cache.num_pages, jnp.int32)
    lens = jnp.full((slots,), width, jnp.int32)
    q8 = jnp.asarray(rng.standard_normal((slots, 1, args.index_heads, args.index_dim)), jnp.float8_e4m3fn)
    w = jnp.asarray(rng.random((slots, args.index_heads)), jnp.float32)
    logits_fn = jax.jit(lambda q8, pool, w, lens, table: index_ops.paged_mqa_logits(q8, pool, w, lens, table, width))
    topk_fn = jax.jit(lambda logits, lens: index_ops.topk_indices(logits, jnp.zeros_like(lens), lens, args.topk))
    slot_fn = jax.jit(lambda table, picked: index_ops.slots_of(table, picked)[:, None, :])
    q = jnp.asarray(rng.standard_normal((slots, 1, args.heads, jfm.HEAD_DIM)), jnp.bfloat16)
    attend = jax.jit(lambda q, pool, ids: jfm.flash_mla_with_kvcache(q, pool, None, None, is_fp8_kvcache=True,
                                                                     indices=ids)[0])
    logits = logits_fn(q8, cache.index_pools[0], w, lens, table)
    picked = topk_fn(logits, lens)
    ids = slot_fn(table, picked)
    n = args.layers
    return dict(indexer=n * _timed(logits_fn, q8, cache.index_pools[0], w, lens, table, reps=reps),
                topk=n * (_timed(topk_fn, logits, lens, reps=reps) + _timed(slot_fn, table, picked, reps=reps)),
                attention=n * _timed(attend, q, cache.pools[0], ids, reps=reps))


def phase_times_v4(args, cache, reps: int) -> dict:
    """Seconds per decode step in the sparse attention of the v4 config (window from the main pool,
    every compressed entry a slot can hold from the extra pool, the sink), run alone at the step's
    shapes (every slot at its longest context, random queries) for every layer."""
    slots, max_pages = cache.block_table.shape
    width = max_pages * jfm.PAGE_SIZE
    rng = np.random.default_rng(args.seed + 1)
    table = jnp.asarray(np.arange(slots * max_pages).reshape(slots, max_pages) % cache.num_pages, jnp.int32)
    window = index_ops.slots_of(table, width - 1 - jnp.arange(args.window, dtype=jnp.int32)[None, :].repeat(slots, 0))
    capacity = cache.extra_pages_per_slot * jfm.PAGE_SIZE
    extra = jnp.arange(slots * capacity, dtype=jnp.int32).reshape(slots, 1, capacity)
    q = jnp.asarray(rng.standard_normal((slots, 1, args.heads, 512)), jnp.bfloat16)
    sink = jnp.asarray(rng.standard_normal(args.heads), jnp.float32)
    attend = jax.jit(lambda q, pool, ids, extra_pool, extra_ids: jfm.flash_mla_with_kvcache(
        q, pool, None, None, is_fp8_kvcache=True, indices=ids, attn_sink=sink, extra_k_cache=extra_pool,
        extra_indices_in_kvcache=extra_ids)[0])
    return dict(attention=args.layers * _timed(attend, q, cache.pools[0], window[:, None, :], cache.extra_pools[0],
                                               extra, reps=reps))


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
    v4 = args.config == "v4"
    if v4:  # room for the compressed entries of the longest request
        cache = nn.init_window_cache(args.layers, num_pages, args.batch, pages_per_seq, max_len // args.compress_stride)
    else:
        cache = nn.init_sparse_cache(args.layers, num_pages, args.batch, pages_per_seq, args.index_dim)
    prefill_len = nn.pages_needed(args.prompt_len) * jfm.PAGE_SIZE  # one padded prompt shape
    oracle_len = pages_per_seq * jfm.PAGE_SIZE
    no_picks = jnp.zeros((0,), jnp.int32)  # v4: the selection follows from the positions

    def prefill(state, cache, tokens, lens, slots):
        out = nnx.merge(graphdef, state).prefill(tokens, lens, slots, cache, args.prefill_chunk or None)
        logits, cache, picks = out if not v4 else out + (no_picks,)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache, picks

    def decode(state, cache, tokens, active):
        out = nnx.merge(graphdef, state).decode(tokens, active, cache)
        logits, cache, picks = out if not v4 else out + (no_picks,)
        return jnp.argmax(logits, -1).astype(jnp.int32), logits, cache, picks

    # XLA may keep bfloat16 intermediates at a higher precision ("excess precision"; XLA:GPU does
    # inside its fusions), which would shrink the bfloat16 oracle's error below what a bfloat16
    # path that rounds at every op boundary (the served one, through its custom calls) incurs; the
    # oracle rounds where it writes bfloat16, on every platform alike.
    @functools.partial(jax.jit, compiler_options={"xla_allow_excess_precision": False})
    def oracle(state, tokens, lens, masks):
        """Logits at position lens-1 of the masked dense path: float32, and bfloat16 with FP8 entries.
        v4: masks is unused (the window and the complete blocks follow from the positions)."""
        model = nnx.merge(graphdef, state)
        take = lambda logits: jnp.take_along_axis(logits, (lens - 1)[:, None, None], axis=1)[:, 0]
        chunk = args.oracle_chunk or None  # query tokens at a time: never [b, h, t, t] scores
        if v4:
            with jax.default_matmul_precision("highest"):
                ref = take(model.masked(tokens, jnp.float32, q_chunk=chunk))
            round_trip = functools.partial(nn.fp8_round_trip, fmt="model1")
            return ref, take(model.masked(tokens, None, round_trip, chunk))
        with jax.default_matmul_precision("highest"):  # true float32 (GPUs would use TF32)
            ref = take(model.masked(tokens, masks, jnp.float32, q_chunk=chunk))
        return ref, take(model.masked(tokens, masks, None, nn.fp8_round_trip, chunk))

    def check(logits, rows):
        """(max |decode - f32 oracle|, max |bf16+FP8 oracle - f32 oracle|, the first over max |f32
        oracle|) for the requests in batch rows `rows`, over their whole histories, each layer's
        attention masked to the positions its indexer picked when the token was served."""
        hist = np.zeros((args.check_rows, oracle_len), np.int32)
        hlen = np.ones(args.check_rows, np.int32)
        masks = np.zeros((0,) if v4 else (args.layers, args.check_rows, oracle_len, oracle_len), bool)
        reqs = [slots[i] for i in rows]
        for j, r in enumerate(reqs):
            n = len(r.tokens)
            hist[j, :n], hlen[j] = r.tokens, n
            if v4:
                continue
            picks = np.stack(r.picks, axis=1)  # [layers, n, topk]
            layer, token, k = np.nonzero(picks >= 0)
            masks[layer, j, token, picks[layer, token, k]] = True
        ref, floor = (np.asarray(a)[:len(reqs)] for a in oracle(state, hist, hlen, masks))
        err = float(np.abs(np.asarray(logits)[rows] - ref).max())
        return err, float(np.abs(floor - ref).max()), err / float(np.abs(ref).max())

    prefill = jax.jit(prefill, donate_argnums=1)  # donated: the pools are updated in place
    decode = jax.jit(decode, donate_argnums=1)
    release = jax.jit(nn.release, donate_argnums=0)

    slots: list[Request | None] = [None] * args.batch
    queue = list(requests)
    pages_reserved = pages_handed_out = pages_returned = 0
    step_times, step_tokens, prefill_time, prefill_tokens = [], [], 0.0, 0
    max_abs = max_rel = max_floor = 0.0
    checks, ok = 0, True
    step = 0
    t_start = time.perf_counter()
    while queue or any(slots):
        # Admit waiting requests into free slots while the page budget allows; one prefill call.
        admitted = []
        for i in range(args.batch):
            if slots[i] is None and queue:
                need = nn.pages_needed(len(queue[0].prompt) + queue[0].max_new)
                if pages_reserved + need > num_pages:
                    break
                pages_reserved += need
                slots[i] = queue.pop(0)
                admitted.append(i)
        if admitted:
            tokens = np.zeros((args.batch, prefill_len), np.int32)
            lens = np.ones(args.batch, np.int32)
            slot_ids = np.full(args.batch, args.batch, np.int32)  # args.batch: a padding row
            for row, i in enumerate(admitted):
                tokens[row, :len(slots[i].prompt)] = slots[i].prompt
                lens[row], slot_ids[row] = len(slots[i].prompt), i
            t0 = time.perf_counter()
            first, cache, picks = prefill(state, cache, tokens, lens, slot_ids)
            first, picks = np.asarray(first), np.asarray(picks)
            prefill_time += time.perf_counter() - t0
            for row, i in enumerate(admitted):
                r = slots[i]
                r.generated.append(int(first[row]))
                if not v4:
                    r.picks.extend(picks[:, row, t] for t in range(len(r.prompt)))
                prefill_tokens += len(r.prompt)
                pages_handed_out += nn.pages_needed(len(r.prompt))

        # One decode step for every slot whose request still wants tokens.
        active = np.array([r is not None and len(r.generated) < r.max_new for r in slots])
        if active.any():
            last = np.array([r.tokens[-1] if r is not None else 0 for r in slots], np.int32)
            t0 = time.perf_counter()
            nxt, logits, cache, picks = decode(state, cache, last, active)
            nxt = np.asarray(nxt)
            step_times.append(time.perf_counter() - t0)
            picks = np.asarray(picks)
            rows = [i for i in range(args.batch) if active[i]]
            for i in rows if not v4 else ():
                slots[i].picks.append(picks[:, i])
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
            before = int(cache.num_free)
            cache = release(cache, done)
            pages_returned += int(cache.num_free) - before
            for i in np.flatnonzero(done):
                pages_reserved -= nn.pages_needed(len(slots[i].prompt) + slots[i].max_new)
                slots[i] = None
    wall = time.perf_counter() - t_start

    # Every page must be back on the free stack, each exactly once.
    num_free = int(cache.num_free)
    free_set = sorted(np.asarray(cache.free_pages)[:num_free].tolist())
    pages_ok = num_free == num_pages and free_set == list(range(num_pages)) and pages_returned == pages_handed_out
    timed = slice(1, None) if len(step_times) > 1 else slice(None)  # the first decode step compiles
    step_s = float(np.median(step_times[timed])) if step_times else 0.0
    timing = phase_times_v4 if v4 else phase_times
    phases = timing(args, cache, args.phase_reps) if args.phase_reps > 0 and step_s > 0 else {}
    result = dict(
        backend=jax.default_backend(), kernel_path=jfm.kernel_path(), shape=args.shape, config=args.config,
        cache=(f"FP8 model1 cache, window {args.window} + compressed 1/{args.compress_stride} + sink" if v4
               else "FP8 v32 cache"), requests=len(requests),
        slots=args.batch, layers=args.layers, heads=args.heads, topk=args.topk,
        prompt_lens=(min(len(r.prompt) for r in requests), max(len(r.prompt) for r in requests)), decode_steps=len(step_times), decode_tokens=sum(step_tokens),
        tokens_per_s=sum(step_tokens[timed]) / max(sum(step_times[timed]), 1e-9), step_ms_median=1e3 * step_s,
        phase_share={k: v / step_s for k, v in phases.items()},
        prefill_tokens=prefill_tokens, prefill_s=prefill_time, wall_s=wall, num_pages=num_pages,
        pages_handed_out=pages_handed_out, pages_returned=pages_returned, pages_ok=pages_ok,
        checks=checks, max_abs_diff=max_abs, max_rel_diff=max_rel, floor_abs_diff=max_floor,
        decode_matches=bool(ok and checks > 0), generated={r.rid: r.generated for r in requests},
    )
    result["ok"] = result["decode_matches"] and pages_ok
    return result


def summary(r) -> str:
    share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["phase_share"].items()) or "not timed"
    topk = "" if r["config"] == "v4" else f"topk {r['topk']}, "
    return (f"serve_sparse: {r['backend']} ({r['kernel_path']}) | {r['requests']} requests, {r['slots']} slots, "
            f"{r['layers']} layers, h_q {r['heads']}, {topk}prompts {r['prompt_lens'][0]}-"
            f"{r['prompt_lens'][1]} tokens, {r['cache']} | {r['decode_tokens']} tokens in "
            f"{r['decode_steps']} decode steps: {r['tokens_per_s']:.1f} tokens/s, {r['step_ms_median']:.2f} ms/step "
            f"(median; of a step: {share}) | pages: pool {r['num_pages']}, {r['pages_handed_out']} handed out, "
            f"{r['pages_returned']} returned{'' if r['pages_ok'] else ' (NOT all)'} | decode vs masked dense f32 "
            f"({r['checks']} checks): max abs {r['max_abs_diff']:.3e}, max rel {r['max_rel_diff']:.3e} "
            f"(bf16 + FP8 entries: {r['floor_abs_diff']:.3e}) {'OK' if r['ok'] else 'FAILED'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    r = run(args)
    print(f"prefill: {r['prefill_tokens']} prompt tokens in {r['prefill_s']:.2f} s (first call compiles); "
          f"wall {r['wall_s']:.1f} s")
    print(summary(r))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
