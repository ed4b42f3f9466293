"""Train a tiny MLA language model whose attention runs through jax_flashmla's kernel.

Every layer writes the batch's 576-wide latent+rope entries into contiguous pages (request i owns
pages i*P .. i*P+P-1) and calls flash_mla_with_kvcache with s_q = sequence length and causal=True;
gradients flow back through the kernel's custom VJP into the query and the entries. Weights and
everything outside attention run in float32, the kernel in bfloat16; optax AdamW updates the weights.

Data are made on the fly, nothing is downloaded: each sequence is a random block of --period tokens
repeated to fill --seq-len. Only the first block is unpredictable; after it, the next token is the
one --period positions back, which a model can only find by attending to it. The loss is measured on
those predictable positions, where a model without working attention cannot beat ln(vocab) (3.47
for the default 32 tokens). The run passes when the loss falls below --threshold (default 1.0 nats)
within --steps steps.

Before training it also checks the kernel path against the naive path (no kernel, full attention)
at initialisation: logits of the same batch may differ from the float32 naive path by at most
--tolerance-factor (2) times what the whole model run in bfloat16 differs.

With --data-parallel N the batch is split over N devices (a 1-D mesh, weights replicated): jit
partitions the step, the kernel runs on each device's share of the requests and pages, and the
gradients are summed across devices by XLA. On the CPU, ask XLA for host devices first, e.g.
XLA_FLAGS=--xla_force_host_platform_device_count=2.

Usage: python3 examples/train.py [--steps 150 --threshold 1.0] [--data-parallel N]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_flashmla as jfm
from jax_flashmla import nn


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=48, help="tokens per sequence (the kernel's s_q)")
    p.add_argument("--period", type=int, default=12, help="length of the repeated block")
    p.add_argument("--vocab", type=int, default=32, help="vocabulary size")
    p.add_argument("--dim", type=int, default=128, help="model width")
    p.add_argument("--heads", type=int, default=2, help="attention heads (h_q)")
    p.add_argument("--q-lora-rank", type=int, default=0, help="0: no query compression")
    p.add_argument("--nope-dim", type=int, default=32, help="qk_nope_head_dim")
    p.add_argument("--v-dim", type=int, default=32, help="v_head_dim")
    p.add_argument("--mlp-dim", type=int, default=256, help="hidden width of each layer's MLP")
    p.add_argument("--steps", type=int, default=150, help="training steps")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--threshold", type=float, default=1.0, help="loss (nats) to reach within --steps")
    p.add_argument("--tolerance-factor", type=float, default=2.0,
                   help="kernel-path logits may differ from the float32 naive path by this times the bfloat16 model's error")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and data")
    p.add_argument("--data-parallel", type=int, default=1, metavar="N",
                   help="split the batch over N devices (1: one device, no mesh)")
    return p.parse_args(argv)


def data_parallel_shardings(n: int, batch: int):
    """(batch sharding, replicated sharding) over a 1-D mesh of n devices, or (None, None) for n = 1."""
    if n == 1:
        return None, None
    if n < 1 or batch % n:
        raise SystemExit(f"--data-parallel {n}: needs n >= 1 dividing --batch {batch}")
    if len(jax.devices()) < n:
        raise SystemExit(f"--data-parallel {n}: this backend has {len(jax.devices())} device(s) "
                         "(on the CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
    return NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


def make_batch(rng, args):
    """int32 [batch, seq_len + 1]: a random block of `period` tokens, repeated."""
    block = rng.integers(0, args.vocab, (args.batch, args.period))
    reps = -(-(args.seq_len + 1) // args.period)
    return np.tile(block, (1, reps))[:, :args.seq_len + 1].astype(np.int32)


def run(args) -> dict:
    """Trains for args.steps steps; returns the summary (also printed by main)."""
    if args.seq_len <= args.period:
        raise SystemExit("--seq-len must exceed --period (nothing would be predictable)")
    rng = np.random.default_rng(args.seed)
    attn = nn.MLAConfig(dim=args.dim, num_heads=args.heads, q_lora_rank=args.q_lora_rank,
                        qk_nope_head_dim=args.nope_dim, v_head_dim=args.v_dim)
    cfg = nn.DecoderConfig(vocab_size=args.vocab, num_layers=args.layers, mlp_dim=args.mlp_dim, attention=attn)
    graphdef, params = nnx.split(nn.MLADecoder(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(args.seed)))
    batch_sharding, replicated = data_parallel_shardings(args.data_parallel, args.batch)

    def place(tokens):
        return tokens if batch_sharding is None else jax.device_put(tokens, batch_sharding)

    def replicate(tree):  # data-parallel: the same copy on every device
        return tree if replicated is None else jax.device_put(tree, replicated)

    params = replicate(params)
    # Targets at index >= period - 1 (token position >= period) repeat a token seen `period` back.
    predictable = jnp.arange(args.seq_len) >= args.period - 1

    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params).causal_paged(tokens[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return jnp.sum(nll * predictable) / (predictable.sum() * tokens.shape[0])

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.lr, weight_decay=0.01))
    opt_state = replicate(tx.init(params))  # as the step returns it: no second compile

    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # Data-parallel: the weights, optimizer state and loss stay replicated from step to step (one
    # compile; the gradient's sum over the devices is XLA's all-reduce).
    train_step = jax.jit(train_step, donate_argnums=(0, 1),
                         **({} if replicated is None else dict(out_shardings=replicated)))

    @jax.jit
    def forward_check(params, tokens):
        """(kernel path, naive float32, naive with the whole model in bfloat16) logits."""
        model = nnx.merge(graphdef, params)
        bf16 = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))
        with jax.default_matmul_precision("highest"):  # true float32 (GPUs would use TF32)
            ref = model.naive(tokens)[0]
        return model.causal_paged(tokens), ref, bf16.naive(tokens)[0]

    kernel, ref, bf16 = forward_check(params, place(make_batch(rng, args)[:, :-1]))
    fwd_err, fwd_floor = float(jnp.abs(kernel - ref).max()), float(jnp.abs(bf16 - ref).max())
    forward_ok = fwd_err <= args.tolerance_factor * fwd_floor

    losses, reached_at, step_times = [], None, []
    for step in range(args.steps):
        tokens = place(make_batch(rng, args))
        t0 = time.perf_counter()
        params, opt_state, loss = train_step(params, opt_state, tokens)
        loss = float(loss)
        step_times.append(time.perf_counter() - t0)
        losses.append(loss)
        if reached_at is None and loss < args.threshold:
            reached_at = step + 1
    timed = step_times[1:] if len(step_times) > 1 else step_times  # the first step compiles
    tokens_per_s = args.batch * args.seq_len * len(timed) / sum(timed)
    result = dict(
        backend=jax.default_backend(), kernel_path=jfm.kernel_path(), devices=args.data_parallel,
        steps=args.steps, threshold=args.threshold,
        chance_loss=float(np.log(args.vocab)), start_loss=losses[0], end_loss=losses[-1], losses=losses,
        reached_at=reached_at, step_ms_median=1e3 * float(np.median(timed)),
        tokens_per_s=tokens_per_s, tokens_per_s_per_device=tokens_per_s / args.data_parallel,
        forward_max_abs_diff=fwd_err, forward_bf16_naive_abs_diff=fwd_floor, forward_ok=forward_ok,
    )
    result["ok"] = reached_at is not None and forward_ok
    return result


def summary(r) -> str:
    reached = f"reached at step {r['reached_at']}" if r["reached_at"] else "NOT reached"
    devices = per_device = ""
    if r["devices"] > 1:
        devices = f", {r['devices']} devices data-parallel"
        per_device = f" ({r['tokens_per_s_per_device']:.0f} per device)"
    return (f"train: {r['backend']} ({r['kernel_path']}){devices} | loss {r['start_loss']:.3f} -> {r['end_loss']:.3f} "
            f"(chance {r['chance_loss']:.2f}), threshold {r['threshold']} {reached} within {r['steps']} steps | "
            f"{r['step_ms_median']:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s{per_device} | kernel vs naive f32 "
            f"forward: max abs {r['forward_max_abs_diff']:.3e} (bf16 naive: {r['forward_bf16_naive_abs_diff']:.3e}) | "
            f"{'OK' if r['ok'] else 'FAILED'}")


def main(argv=None) -> int:
    r = run(parse_args(argv))
    print(summary(r))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
