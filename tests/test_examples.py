"""The Flax examples' core loops on the CPU, in small configurations, and the paged cache they use.

examples/ is not a package: the scripts are imported from their files, found relative to this one.
(Bazel's per-file test targets carry only tests/ and the package, so there these tests skip.)
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

from jax_flashmla import nn  # noqa: E402

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def _load(name):
    path = EXAMPLES / f"{name}.py"
    if not path.exists():
        pytest.skip(f"{path} is not part of this test's files")
    module_name = f"_example_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[module_name]


# Tiny model; prompts up to 80 tokens plus up to 12 new ones cross page boundaries (64) while
# prefilling and while decoding. 5 pages with 3 slots and 2-page requests: admissions must wait for
# pages, and 7 requests need far more than 5 pages over the run, so pages are recycled.
SERVE_FLAGS = ["--layers", "2", "--batch", "3", "--requests", "7", "--prompt-len", "80", "--new-tokens", "12",
               "--dim", "64", "--heads", "4", "--q-lora-rank", "32", "--nope-dim", "16", "--v-dim", "16",
               "--mlp-dim", "128", "--vocab", "128", "--pages", "5", "--check-every", "1", "--seed", "1"]


def test_serve_decode_matches_naive_with_continuous_batching():
    serve = _load("serve")
    args = serve.parse_args(SERVE_FLAGS)
    r = serve.run(args)
    assert r["ok"], serve.summary(r)
    # Every decode step was checked against the float32 naive path, within the stated bound.
    assert r["checks"] == r["decode_steps"] > 0
    assert 0 < r["max_abs_diff"] <= args.tolerance_factor * r["bf16_naive_abs_diff"]
    assert r["max_rel_diff"] < 0.05  # bfloat16 noise is ~1%; a wrong page or position is ~30%+
    # Continuous batching: every request got its tokens, pages were handed out beyond the pool's
    # size (so recycled) and all came back.
    assert r["pages_returned"] and r["pages_handed_out"] > r["num_pages"]
    lens = [len(g) for g in r["generated"].values()]
    assert len(lens) == 7 and all(6 <= n <= 12 for n in lens)
    assert r["decode_tokens"] == sum(lens) - 7  # the first token of each request comes from prefill
    assert r["decode_steps"] < r["decode_tokens"]  # requests shared steps


def test_serve_check_fails_on_a_wrong_softmax_scale(monkeypatch):
    """The decode check is sharp: the kernel's default scale (576 ** -0.5) instead of the model's
    (nope + rope) ** -0.5 must fail it."""
    serve = _load("serve")
    real = nn.mla.api.flash_mla_with_kvcache

    def default_scale(*args, softmax_scale=None, **kwargs):
        return real(*args, **kwargs)

    monkeypatch.setattr(nn.mla.api, "flash_mla_with_kvcache", default_scale)
    r = serve.run(serve.parse_args(SERVE_FLAGS + ["--requests", "3", "--check-every", "2"]))
    assert not r["decode_matches"] and not r["ok"]
    assert r["max_abs_diff"] > 4 * r["bf16_naive_abs_diff"]


def test_serve_main_prints_summary_and_exit_code(capsys):
    serve = _load("serve")
    assert serve.main(SERVE_FLAGS + ["--requests", "2", "--check-every", "3"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("serve: ") and "tokens/s" in line and "ms/step" in line and line.endswith("OK")


def test_train_loss_falls_below_threshold(capsys):
    train = _load("train")
    args = train.parse_args([])  # the documented defaults: threshold 1.0 nats within 150 steps
    r = train.run(args)
    assert r["ok"], train.summary(r)
    assert r["start_loss"] > 0.9 * r["chance_loss"]  # starts at chance (ln 32 = 3.47) ...
    assert r["reached_at"] is not None and r["end_loss"] < args.threshold  # ... and learns to copy
    assert r["forward_max_abs_diff"] <= args.tolerance_factor * r["forward_bf16_naive_abs_diff"]


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (tests/conftest.py gives the CPU 8)")
def test_train_data_parallel_reaches_threshold_with_the_decode_partitioned():
    train = _load("train")
    args = train.parse_args(["--data-parallel", "2"])
    r = train.run(args)
    assert r["ok"], train.summary(r)
    assert r["devices"] == 2 and "2 devices data-parallel" in train.summary(r)
    assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 2)

    # The step's decode runs on each device's half of the batch, not on a gathered batch.
    from flax import nnx
    from jax_flashmla import _ffi

    attn = nn.MLAConfig(dim=32, num_heads=2, qk_nope_head_dim=8, v_head_dim=8)
    cfg = nn.DecoderConfig(vocab_size=16, num_layers=1, mlp_dim=32, attention=attn)
    graphdef, params = nnx.split(nn.MLADecoder(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    batch_sharding, replicated = train.data_parallel_shardings(2, 4)  # the example's own mesh
    tokens = jax.device_put(jnp.zeros((4, 70), jnp.int32), batch_sharding)
    loss = lambda p, t: jnp.sum(nnx.merge(graphdef, p).causal_paged(t))
    hlo = jax.jit(jax.grad(loss)).lower(jax.device_put(params, replicated), tokens).compile().as_text()
    calls = [line for line in hlo.splitlines() if f'custom_call_target="{_ffi.DECODE_TARGET}"' in line]
    assert calls and all("bf16[2,70,2,512]" in line for line in calls), calls
    # Its backward is partitioned too: no all-gather of the page pool (nor of anything else).
    assert "all-gather" not in hlo, [line for line in hlo.splitlines() if "all-gather" in line][:3]


def test_training_attention_goes_through_the_kernel():
    """The training forward and its gradient contain the library's op (not a jnp re-implementation)."""
    from flax import nnx

    attn = nn.MLAConfig(dim=32, num_heads=2, qk_nope_head_dim=8, v_head_dim=8)
    cfg = nn.DecoderConfig(vocab_size=16, num_layers=1, mlp_dim=32, attention=attn)
    graphdef, params = nnx.split(nn.MLADecoder(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((2, 70), jnp.int32)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p).causal_paged(tokens))
    text = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert "jax_flashmla_attention" in text


# --- the sparse decode example ----------------------------------------------------------------------

# Pages of 61 tokens, requests shorter than topk (so rows end in -1), 3 query tokens seeing 1 more
# token each (causal).
SPARSE_FLAGS = ["--batch", "3", "--context", "200", "--seqlen-q", "3", "--heads", "16", "--topk", "256",
                "--page-size", "61", "--iters", "1", "--seed", "1"]


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_sparse_decode_matches_reference(fmt):
    sparse = _load("sparse_decode")
    r = sparse.run(sparse.parse_args(SPARSE_FLAGS + ["--format", fmt]))
    assert r["ok"], sparse.summary(r)
    assert r["out_shape"] == (3, 3, 16, 512) and r["lse_shape"] == (3, 16, 3)
    # The indexer's rows: query token j of request i names min(topk, len_i - 3 + j + 1) distinct slots,
    # each a token of its request's pages before that bound (causal), then -1.
    ids, lens, table = r["indices"], r["lengths"], r["page_table"]
    assert ids.shape == (3, 3, 256) and (ids == -1).any() and (lens > 256).any()
    for i in range(3):
        for j in range(3):
            visible = lens[i] - 3 + j + 1
            named = ids[i, j][ids[i, j] >= 0]
            assert len(named) == len(set(named.tolist())) == min(256, visible), (i, j)
            assert np.all(ids[i, j, len(named):] == -1)
            pages = table[i, :-(-lens[i] // 61)].tolist()
            positions = np.array([pages.index(s // 61) * 61 + s % 61 for s in named.tolist()])
            assert positions.max() < visible, (i, j)
    assert np.isfinite(r["out_max_abs_diff"]) and r["out_max_abs_diff"] < 1e-2


def test_sparse_decode_check_fails_on_a_wrong_softmax_scale(monkeypatch):
    """The example's check is sharp: a softmax scale 5% off the default fails it."""
    import jax_flashmla

    sparse = _load("sparse_decode")
    real = jax_flashmla.flash_mla_with_kvcache

    def off_scale(*args, **kwargs):
        return real(*args, softmax_scale=1.05 * 576 ** -0.5, **kwargs)

    monkeypatch.setattr(jax_flashmla, "flash_mla_with_kvcache", off_scale)
    r = sparse.run(sparse.parse_args(SPARSE_FLAGS))
    assert not r["out_matches"] and not r["lse_matches"] and not r["ok"]


def test_sparse_decode_main_prints_summary_and_help(capsys):
    sparse = _load("sparse_decode")
    assert sparse.main(SPARSE_FLAGS + ["--format", "model1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("sparse_decode: ") and "model1 pool" in line and "ms/step" in line and line.endswith("OK")
    with pytest.raises(SystemExit) as done:
        sparse.parse_args(["--help"])
    assert done.value.code == 0 and "--topk" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        sparse.parse_args(["--topk", "0"])
    assert done.value.code == 2


def test_fp8_cache_doc_snippet_does_what_it_says():
    """docs/fp8_cache.md's "Filling a pool": the shapes its comments state, and the token-by-token
    writes land at their slots (two tokens written, the -1 one skipped, every other byte zero)."""
    import jax_flashmla as jfm

    path = EXAMPLES.parent / "docs" / "fp8_cache.md"
    if not path.exists():
        pytest.skip(f"{path} is not part of this test's files")
    code = path.read_text().split("## Filling a pool", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    env = {}
    exec(compile(code, "docs/fp8_cache.md (Filling a pool)", "exec"), env)
    fmt, kv, back, pool = env["fmt"], env["kv"], env["back"], env["pool"]
    assert jfm.quantize_kv_cache(kv, fmt).shape == (16, 65, 1, 576) and back.shape == (16, 64, 1, 512)
    assert jfm.quantize_kv_cache(kv, fmt).dtype == jnp.float8_e4m3fn and back.dtype == jnp.bfloat16
    whole = np.asarray(jfm.quantize_kv_cache(kv[:2, :1], fmt, jnp.uint8))  # tokens (0, 0) and (1, 0)
    written = jfm.dequantize_kv_cache(pool, fmt)
    np.testing.assert_array_equal(np.asarray(written[:2, 0], np.float32),
                                  np.asarray(jfm.dequantize_kv_cache(whole, fmt)[:, 0], np.float32))
    pool = np.asarray(pool)
    assert pool.dtype == np.uint8 and np.count_nonzero(pool) == np.count_nonzero(whole)


# --- the paged cache -------------------------------------------------------------------------------

def _live_pages(cache):
    table, lens = np.asarray(cache.block_table), np.asarray(cache.seq_lens)
    return [table[i, :nn.pages_needed(int(n))].tolist() for i, n in enumerate(lens)]


def test_page_allocator_hands_out_each_page_once_and_takes_all_back():
    rng = np.random.default_rng(0)
    slots, num_pages, max_pages = 4, 12, 3
    cache = nn.init_cache(1, num_pages, slots, max_pages)
    grow = jax.jit(nn.grow, donate_argnums=0)
    release = jax.jit(nn.release, donate_argnums=0)
    handed_out = 0
    for _ in range(40):
        lens = np.asarray(cache.seq_lens)
        if rng.random() < 0.3:
            cache = release(cache, jnp.asarray(rng.random(slots) < 0.5))
        else:
            new = np.minimum(lens + rng.integers(0, 70, slots), max_pages * 64)
            if sum(nn.pages_needed(int(n)) for n in new) <= num_pages:  # the caller's budget
                cache = grow(cache, jnp.asarray(new, jnp.int32))
                handed_out += sum(nn.pages_needed(int(n)) - nn.pages_needed(int(m)) for n, m in zip(new, lens))
        live = [p for pages in _live_pages(cache) for p in pages]
        free = np.asarray(cache.free_pages)[:int(cache.num_free)].tolist()
        assert len(live) == len(set(live)), "a page was handed to two sequences"
        assert sorted(live + free) == list(range(num_pages)), "pages were lost or duplicated"
    assert handed_out > 2 * num_pages  # the walk recycled pages
    cache = release(cache, jnp.ones(slots, bool))
    assert int(cache.num_free) == num_pages and not np.asarray(cache.seq_lens).any()


def test_write_places_tokens_at_their_positions_and_drops_padding():
    cache = nn.init_cache(1, 6, 2, 3)
    cache = nn.grow(cache, jnp.asarray([70, 0], jnp.int32))  # slot 0: 2 pages, slot 1: none
    entries = jnp.arange(2 * 4 * 576, dtype=jnp.float32).reshape(2, 4, 576).astype(jnp.bfloat16) + 1
    # Row 0 writes tokens 62..64 (3 valid of 4: across a page boundary); row 1 writes nothing.
    pool = nn.write(cache.pools[0], cache.block_table, jnp.asarray([62, 0]), entries, jnp.asarray([3, 0]))
    table = np.asarray(cache.block_table)
    pool, entries = np.asarray(pool, np.float32), np.asarray(entries, np.float32)
    np.testing.assert_array_equal(pool[table[0, 0], 62:64, 0], entries[0, :2])
    np.testing.assert_array_equal(pool[table[0, 1], 0, 0], entries[0, 2])
    assert np.count_nonzero(pool.any(axis=-1)) == 3  # nothing else was written


# --- the sparse serving example --------------------------------------------------------------------

# Tiny V3.2-style model; prompts up to 80 tokens plus up to 8 new ones cross the 64-token page while
# prefilling and decoding; topk 16 is below most contexts (the indexer really selects) and above the
# shortest prompts (rows end in -1). 5 pages, 3 slots, 2-page requests: admissions wait for pages and
# pages are recycled.
SERVE_SPARSE_FLAGS = ["--layers", "2", "--batch", "3", "--requests", "5", "--prompt-len", "80", "--new-tokens", "8",
                      "--topk", "16", "--dim", "64", "--heads", "4", "--q-lora-rank", "32", "--nope-dim", "16",
                      "--v-dim", "16", "--index-heads", "4", "--index-dim", "32", "--mlp-dim", "128", "--vocab", "128",
                      "--pages", "5", "--check-every", "1", "--phase-reps", "1", "--seed", "1"]


def test_serve_sparse_decode_matches_the_masked_dense_oracle():
    serve = _load("serve_sparse")
    args = serve.parse_args(SERVE_SPARSE_FLAGS)
    r = serve.run(args)
    assert r["ok"], serve.summary(r)
    assert r["checks"] == r["decode_steps"] > 0
    assert 0 < r["max_abs_diff"] <= args.tolerance_factor * r["floor_abs_diff"]
    assert r["max_rel_diff"] < 0.1  # FP8 entries and bfloat16: a few percent; a wrong slot: far more
    assert r["pages_ok"] and r["pages_returned"] == r["pages_handed_out"] > r["num_pages"]
    lens = [len(g) for g in r["generated"].values()]
    assert len(lens) == 5 and all(4 <= n <= 8 for n in lens)
    assert r["decode_tokens"] == sum(lens) - 5 and r["decode_steps"] < r["decode_tokens"]
    assert set(r["phase_share"]) == {"indexer", "topk", "attention"} and all(v > 0 for v in r["phase_share"].values())


def _shift_valid(indices):
    return jnp.where(indices >= 0, indices + 1, indices)


def test_serve_sparse_check_fails_when_a_decode_index_is_off_by_one(monkeypatch):
    """The attention reads slot + 1 instead of the indexer's slot: the check must fail."""
    serve = _load("serve_sparse")
    real = nn.mla.api.flash_mla_with_kvcache

    def off_by_one(*args, indices=None, **kwargs):
        return real(*args, indices=_shift_valid(indices), **kwargs)

    monkeypatch.setattr(nn.mla.api, "flash_mla_with_kvcache", off_by_one)
    r = serve.run(serve.parse_args(SERVE_SPARSE_FLAGS + ["--layers", "1", "--requests", "2", "--check-every", "2", "--phase-reps", "0"]))
    assert not r["decode_matches"] and not r["ok"]
    assert r["max_abs_diff"] > 2 * r["floor_abs_diff"]


def test_serve_sparse_check_fails_when_a_prefill_index_is_off_by_one(monkeypatch):
    """The prompt tokens attend to row + 1 instead of the indexer's row: the check must fail. (Two
    layers: with one, the prefill's attention output never reaches a decode step's logits.)"""
    serve = _load("serve_sparse")
    real = nn.mla.api.flash_mla_sparse_fwd

    def off_by_one(q, kv, indices, *args, **kwargs):
        return real(q, kv, _shift_valid(indices), *args, **kwargs)

    monkeypatch.setattr(nn.mla.api, "flash_mla_sparse_fwd", off_by_one)
    r = serve.run(serve.parse_args(SERVE_SPARSE_FLAGS + ["--requests", "2", "--check-every", "2", "--phase-reps", "0"]))
    assert not r["decode_matches"] and not r["ok"]


def test_serve_sparse_main_prints_summary_and_help(capsys):
    serve = _load("serve_sparse")
    assert serve.main(SERVE_SPARSE_FLAGS + ["--requests", "2", "--check-every", "3"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("serve_sparse: ") and "tokens/s" in line and "ms/step" in line and line.endswith("OK")
    assert "indexer" in line and "attention" in line and "handed out" in line
    with pytest.raises(SystemExit) as done:
        serve.parse_args(["--help"])
    assert done.value.code == 0 and "--topk" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        serve.parse_args(["--topk", "0"])
    assert done.value.code == 2


def test_serve_sparse_v32_shape_runs_on_the_cpu_at_a_reduced_prompt_len():
    """--shape v32 sets DeepSeek-V3.2's attention shape; on the CPU it serves a few decode steps at a
    96-token prompt (one layer), its chunked oracle passing."""
    serve = _load("serve_sparse")
    flags = ["--shape", "v32", "--prompt-len", "96", "--new-tokens", "6", "--requests", "2", "--batch", "2",
             "--layers", "1", "--check-every", "1", "--phase-reps", "0", "--prefill-chunk", "32", "--oracle-chunk", "40"]
    args = serve.parse_args(flags)
    assert (args.heads, args.topk, args.index_heads, args.index_dim, args.nope_dim, args.v_dim) == (128, 2048, 64, 128,
                                                                                                     128, 128)
    assert (args.layers, args.prompt_len, args.min_prompt_len) == (1, 96, 96)  # explicit options win
    assert serve.parse_args(["--shape", "v32"]).prompt_len >= serve.parse_args(["--shape", "v32"]).min_prompt_len >= 4096
    r = serve.run(args)
    assert r["ok"], serve.summary(r)
    assert r["decode_steps"] >= 2 and r["checks"] == r["decode_steps"] and r["prompt_lens"] == (96, 96)
    assert 0 < r["max_abs_diff"] <= args.tolerance_factor * r["floor_abs_diff"] and r["max_rel_diff"] < 0.1


def test_chunked_oracle_and_prefill_equal_the_unchunked_ones():
    """SparseMLADecoder.masked with q_chunk (the oracle at long prompts) gives the unchunked logits and
    holds no [b, h, s, s] array; sparse_prefill with q_chunk gives the unchunked output."""
    from flax import nnx

    h = 8
    attn = nn.MLAConfig(dim=32, num_heads=h, qk_nope_head_dim=16, v_head_dim=16)
    index = nn.IndexerConfig(dim=32, num_heads=2, head_dim=16, rope_dim=8, topk=8)
    model = nn.SparseMLADecoder(nn.SparseDecoderConfig(vocab_size=64, num_layers=2, mlp_dim=64, attention=attn,
                                                       indexer=index), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    b, s = 2, 120  # [b, h, s, s] scores are the largest array of an unchunked run
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (b, s)), jnp.int32)
    causal = np.tril(np.ones((s, s), bool))
    masks = jnp.asarray(causal & (rng.random((2, b, s, s)) < 0.4) | np.eye(s, dtype=bool))
    masks = masks.at[0, 0, 7].set(False)  # a query with nothing to read: 0 either way
    with jax.default_matmul_precision("highest"):
        whole = model.masked(tokens, masks, jnp.float32)
        chunked = model.masked(tokens, masks, jnp.float32, q_chunk=16)  # 8 chunks, the last one padded
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-5, atol=1e-5)

    def avals(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (v.aval for v in eqn.outvars)
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else [p]):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        yield from avals(getattr(inner, "jaxpr", inner))

    def query_by_key(q_chunk):  # computed (non-mask) arrays with a query axis and a key axis of length s
        jaxpr = jax.make_jaxpr(lambda t, m: model.masked(t, m, jnp.float32, q_chunk=q_chunk))(tokens, masks)
        return [a.shape for a in avals(jaxpr.jaxpr) if a.dtype != jnp.bool_ and a.shape.count(s) >= 2]
    assert (b, h, s, s) in query_by_key(None) and query_by_key(16) == []
    x = jax.random.normal(jax.random.PRNGKey(1), (b, s, 32), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    ids = jnp.asarray(np.where(rng.random((b, s, 8)) < 0.9, rng.integers(0, s, (b, s, 8)), -1), jnp.int32)
    blk = model.blocks[0].attn
    want, _ = blk.sparse_prefill(x, pos, ids)
    got, _ = blk.sparse_prefill(x, pos, ids, q_chunk=16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


# The v4 config on the same tiny model: a 16-token window and 4-token blocks (prompts of 20-80 tokens
# read compressed entries well outside their window, and decode steps complete blocks).
SERVE_V4_FLAGS = SERVE_SPARSE_FLAGS + ["--config", "v4", "--window", "16", "--compress-stride", "4"]


def test_serve_sparse_v4_decode_matches_the_dense_oracle_over_window_and_compressed_entries():
    serve = _load("serve_sparse")
    args = serve.parse_args(SERVE_V4_FLAGS)
    r = serve.run(args)
    assert r["ok"], serve.summary(r)
    assert r["checks"] == r["decode_steps"] > 0 and "model1" in r["cache"]
    assert 0 < r["max_abs_diff"] <= args.tolerance_factor * r["floor_abs_diff"] and r["max_rel_diff"] < 0.1
    assert r["pages_ok"] and r["pages_returned"] == r["pages_handed_out"] > r["num_pages"]
    assert set(r["phase_share"]) == {"attention"}


def _shift_extra(kwargs):
    ids = kwargs["extra_indices_in_kvcache"]
    return dict(kwargs, extra_indices_in_kvcache=_shift_valid(ids))


@pytest.mark.parametrize("fault", ["window", "compressed", "no_sink"])
def test_serve_sparse_v4_check_fails_on_a_wrong_selection_or_a_missing_sink(monkeypatch, fault):
    """Decode reads the window's slot + 1, or the compressed entry after the right one, or runs without
    the sink (prefill too): the check must fail."""
    serve = _load("serve_sparse")
    real_decode, real_prefill = nn.mla.api.flash_mla_with_kvcache, nn.mla.api.flash_mla_sparse_fwd

    def decode(*args, indices=None, **kwargs):
        if fault == "window":
            indices = _shift_valid(indices)
        elif fault == "compressed":
            kwargs = _shift_extra(kwargs)
        else:
            kwargs["attn_sink"] = None
        return real_decode(*args, indices=indices, **kwargs)

    def prefill(*args, attn_sink=None, **kwargs):
        return real_prefill(*args, attn_sink=None if fault == "no_sink" else attn_sink, **kwargs)

    monkeypatch.setattr(nn.mla.api, "flash_mla_with_kvcache", decode)
    monkeypatch.setattr(nn.mla.api, "flash_mla_sparse_fwd", prefill)
    r = serve.run(serve.parse_args(SERVE_V4_FLAGS + ["--layers", "1", "--requests", "2", "--check-every", "1",
                                                     "--phase-reps", "0"]))
    assert not r["decode_matches"] and not r["ok"]
    assert r["max_abs_diff"] > 2 * r["floor_abs_diff"]


def test_write_fp8_places_quantised_tokens_at_their_slots_and_drops_padding():
    import jax_flashmla as jfm

    cache = nn.init_sparse_cache(1, 4, 2, 2, 32)
    cache = nn.grow(cache, jnp.asarray([70, 0], jnp.int32))
    entries = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 576), jnp.float32).astype(jnp.bfloat16)
    pool = nn.write_fp8(cache.pools[0], cache.block_table, jnp.asarray([62, 0]), entries, jnp.asarray([3, 0]))
    assert pool.shape == (4, 64, 1, 656) and pool.dtype == jnp.uint8
    back = np.asarray(jfm.dequantize_kv_cache(pool, "v32", jnp.float32))
    want = np.asarray(nn.fp8_round_trip(jnp.pad(entries[:1, :3], ((0, 0), (0, 61), (0, 0)))))[0, :3]
    table = np.asarray(cache.block_table)
    np.testing.assert_array_equal(back[table[0, 0], 62:64, 0], want[:2])
    np.testing.assert_array_equal(back[table[0, 1], 0, 0], want[2])
    assert np.count_nonzero(np.asarray(pool).reshape(4 * 64, 656).any(axis=-1)) == 3


def test_mla_sparse_paths_match_naive_with_the_same_selection():
    """sparse_prefill (bf16 entries) and sparse_decode (FP8 pool) against naive attention masked to
    the same rows, in float32 over the same rounded entries."""
    from flax import nnx

    cfg = nn.MLAConfig(dim=32, num_heads=4, qk_nope_head_dim=16, v_head_dim=16)
    attn = nn.MultiHeadLatentAttention(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    s, topk = 64, 8
    x = jax.random.normal(jax.random.PRNGKey(1), (1, s, 32), jnp.float32)
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    rng = np.random.default_rng(0)
    ids = np.full((1, s, topk), -1, np.int32)
    for t in range(s):
        k = min(topk, t + 1)
        ids[0, t, :k] = rng.choice(t + 1, k, replace=False)
    ids = jnp.asarray(ids)
    mask = nn.selection_mask(ids, s)
    bf16 = lambda e: e.astype(jnp.bfloat16).astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        out, entries = attn.sparse_prefill(x, pos, ids)
        want, _ = attn.naive(x, pos, mask, bf16)
        # FlashMLA's relative bound (2.01 / 128), against the output's scale: the op rounds q and its
        # output to bfloat16, and W_UV and wo spread that over every channel.
        assert np.abs(np.asarray(out) - np.asarray(want)).max() < 2.01 / 128 * np.abs(np.asarray(want)).max()
        # Decode of the last token over an FP8 pool holding all 64 entries (page 0).
        pool = nn.write_fp8(nn.init_sparse_cache(1, 1, 1, 1).pools[0], jnp.zeros((1, 1), jnp.int32),
                            jnp.zeros(1, jnp.int32), entries, jnp.asarray([s]))
        got = attn.sparse_decode(x[:, -1:], pos[:, -1:], pool, ids[:, -1:])
        want, _ = attn.naive(x, pos, mask, nn.fp8_round_trip)
        bound = 2.01 / 128 * np.abs(np.asarray(want[:, -1])).max()
        assert np.abs(np.asarray(got[:, 0]) - np.asarray(want[:, -1])).max() < bound
        # Off by one: far outside that bound.
        bad = attn.sparse_decode(x[:, -1:], pos[:, -1:], pool, jnp.where(ids[:, -1:] >= 0, (ids[:, -1:] + 1) % s, -1))
        assert np.abs(np.asarray(bad[:, 0]) - np.asarray(want[:, -1])).max() > 10 * bound
