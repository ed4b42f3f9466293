"""benchmarks/bench_indexer.py: the issue's decode matrix and its filters, the byte and FLOP counts by
hand, the random key pool's layout, and a tiny run of the command line on the CPU with its JSON round
trip."""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_indexer  # noqa: E402


def _plan(*argv):
    args = bench_indexer.parser().parse_args(list(argv))
    return bench_indexer.plan(args), args


def test_the_issues_decode_matrix_and_filters():
    cases, args = _plan()
    assert len(cases) == 12 and args.topk == 2048 and args.attn_heads == 128
    assert {(c.b, c.next_n, c.context) for c in cases} == {(b, n, s) for b in (64, 128) for n in (1, 2)
                                                            for s in (4096, 16384, 65536)}
    assert {(c.heads, c.head_dim) for c in cases} == {(64, 128)}
    contexts = [c.context for c in cases]  # one pool serves consecutive cases
    assert sum(a != b for a, b in zip(contexts, contexts[1:])) == 2
    cases, _ = _plan("--cases", "b=128,context=65536/8192")
    assert {(c.b, c.context) for c in cases} == {(128, 65536), (128, 8192)} and len(cases) == 4
    with pytest.raises(ValueError, match="--cases"):
        _plan("--cases", "h_q=64")
    cases, args = _plan("--smoke")
    assert args.topk == 32 and max(c.context for c in cases) <= 320


def test_counts_by_hand():
    c = bench_indexer.IndexerCase(b=2, next_n=2, context=128)
    n = bench_indexer.indexer_counts(c, topk=32, attn_heads=16)
    # 2 requests x 128 tokens x (128 e4m3 bytes + a 4-byte scale), read once whatever next_n
    assert n["key_bytes"] == 2 * 128 * 132 == 33792
    assert n["logits_bytes"] == 4 * (2 * 2) * 128  # float32 [b * next_n, context]
    assert n["flops"] == 2 * 4 * 64 * 128 * 128
    assert n["attn_bytes"] == 4 * 32 * 656  # each query gathers its topk FP8 v32 entries
    assert bench_indexer.indexer_counts(bench_indexer.IndexerCase(1, 1, 16), 32, 16)["attn_bytes"] == 16 * 656


def test_random_key_pool_has_the_paged_layout():
    from jax_flashmla import indexer as ix

    pool = bench_indexer.random_key_pool(jax, jax.random.PRNGKey(0), 3)
    assert pool.shape == (3, 64, 1, 132) and pool.dtype == np.uint8
    values, scales = ix.read_key_pool(pool)
    scales = np.asarray(scales)
    assert values.shape == (3, 64, 128) and np.all((scales >= 0.5) & (scales < 1.0))
    raw = np.asarray(pool).reshape(3, -1)
    np.testing.assert_array_equal(raw[:, 64 * 128:].view(np.float32), scales)  # the scales after the values
    assert np.isfinite(np.asarray(values, np.float32)).all()


def test_smoke_run_writes_json_and_renders(tmp_path, capsys):
    out = tmp_path / "ix.json"
    assert bench_indexer.main(["--smoke", "--cases", "context=128", "--iters", "2", "--baseline-iters", "2",
                               "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["indexer"]
    assert [(r["b"], r["next_n"], r["context"]) for r in rows] == [(2, 1, 128), (2, 2, 128)]
    for r in rows:
        assert "error" not in r and r["topk_ok"] and r["key_bytes"] == 2 * 128 * 132
        assert r["gbps"] == pytest.approx(r["key_bytes"] / (r["logits_ms"] * 1e-3) / 1e9)
        assert r["decode_ms"] == pytest.approx(r["logits_ms"] + r["topk_ms"] + r["attn_ms"])
        assert r["logits_share"] + r["topk_share"] + r["attn_share"] == pytest.approx(1.0)
    assert report["baselines"]["copy"]["gbps"] > 0
    capsys.readouterr()
    assert bench_indexer.main(["--from-json", str(out), "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "| b | next_n | context | logits ms | GB/s | BW% |" in text and "of the copy bandwidth" in text
