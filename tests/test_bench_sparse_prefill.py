"""benchmarks/bench_prefill.py: the issue's prefill matrix and its filters, FlashMLA's FLOP count (and
ours for the backward) by hand, the index draw (distinct, valid, causal, invalid entries, bounded
memory), the side by side's refusals and the run without FlashMLA, the summary against the issue's
targets, and a tiny run of the command line on the CPU with its JSON round trip."""

import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_prefill  # noqa: E402
import mla_bench  # noqa: E402


def _plan(*argv):
    return bench_prefill.plan(bench_prefill.parser().parse_args(list(argv)))


def test_the_issues_prefill_matrix():
    cases = _plan()
    v32 = [c for c in cases if c.suite == "v32"]
    v4 = [c for c in cases if c.suite == "v4"]
    assert len(v32) == 6 and len(v4) == 12 and len(cases) == 18
    assert {(c.d_qk, c.topk, c.s_q) for c in v32} == {(576, 2048, 4096)}
    assert {(c.d_qk, c.s_q) for c in v4} == {(512, 4096)} and {c.topk for c in v4} == {512, 1024}
    for group in (v32, v4):
        assert {c.s_kv for c in group} == {8192, 32768, 65536} and {c.h_q for c in group} == {64, 128}
    # kv (d_qk, s_kv) and the index draw (s_kv, topk) serve consecutive cases.
    keys = [(c.d_qk, c.s_kv) for c in cases]
    assert sum(a != b for a, b in zip(keys, keys[1:])) == len(set(keys)) - 1
    draws = [(c.s_kv, c.topk) for c in cases]
    assert sum(a != b for a, b in zip(draws, draws[1:])) == len(set(draws)) - 1
    # FlashMLA runs every case of the matrix.
    assert all(bench_prefill.flashmla_refusal(c) is None for c in cases)


def test_filters_and_their_errors():
    cases = _plan("--suite", "v4", "--cases", "s_kv=8192,h_q=128")
    assert [(c.topk, c.h_q, c.s_kv) for c in cases] == [(512, 128, 8192), (1024, 128, 8192)]
    cases = _plan("--cases", "h_q=32,topk=2048,s_kv=8192")  # h_q 32 added to both, topk 2048 to v4
    assert [(c.suite, c.d_qk, c.h_q, c.topk) for c in cases] == [("v32", 576, 32, 2048), ("v4", 512, 32, 2048)]
    assert [c.suite for c in _plan("--suite", "v32", "--cases", "d_qk=512")] == []
    with pytest.raises(ValueError, match="--suite: unknown suite 'v3'"):
        _plan("--suite", "v3")
    with pytest.raises(ValueError, match="--cases: bad case filter term 'b=2'"):
        _plan("--cases", "b=2")
    with pytest.raises(ValueError, match="--invalid: expected a probability"):
        _plan("--invalid", "1.5")


def test_flop_counts_by_hand():
    # s_q 3, topk 4, h_q 2 at d_qk 576: 12 attended entries, 10 of them valid.
    c = bench_prefill.PrefillCase("v32", 576, 2, 3, 50, 4)
    n = bench_prefill.prefill_counts(c, num_valid=10)
    assert n["attended"] == 12
    assert n["flops"] == 2 * 12 * 2 * (576 + 512) == 52_224
    assert n["bwd_flops"] == 2 * 12 * 2 * (3 * 576 + 2 * 512) == 132_096
    assert n["bytes"] == 2 * 10 * 576 + 2 * 3 * 2 * (576 + 512) == 24_576
    # d_qk 512: the exact backward count is the 2.5x convention.
    c = bench_prefill.PrefillCase("v4", 512, 64, 4096, 8192, 512)
    n = bench_prefill.prefill_counts(c, num_valid=4096 * 512)
    assert n["bwd_flops"] == 2.5 * n["flops"] == 2.5 * 2 * 4096 * 512 * 64 * 1024
    # FlashMLA's V3.2 row at 640 TFLOPS would take 2 * 4096 * 2048 * 128 * 1088 / 640e12 s = 3.65 ms.
    c = bench_prefill.PrefillCase("v32", 576, 128, 4096, 65536, 2048)
    assert bench_prefill.prefill_counts(c, 0)["flops"] / 640e12 == pytest.approx(3.6506e-3, rel=1e-4)


def test_indices_are_distinct_valid_and_random():
    rng = np.random.default_rng(0)
    idx = bench_prefill.draw_indices(rng, s_q=50, s_kv=300, topk=64, chunk_elems=1000)  # 3 rows a chunk
    assert idx.shape == (50, 1, 64) and idx.dtype == np.int32
    rows = idx[:, 0]
    assert ((rows >= 0) & (rows < 300)).all()
    assert all(len(set(r)) == 64 for r in rows)
    assert len({tuple(r) for r in rows}) == 50 and not all((np.diff(r) > 0).all() for r in rows)  # not sorted
    # Every kv row gets picked about equally often: 50 * 64 / 300 = 10.7 a row.
    counts = np.bincount(rows.ravel(), minlength=300)
    assert counts.min() >= 1 and counts.max() <= 30
    # topk beyond s_kv: all rows, then -1.
    idx = bench_prefill.draw_indices(rng, s_q=4, s_kv=10, topk=16)[:, 0]
    assert all(sorted(r[:10]) == list(range(10)) for r in idx) and (idx[:, 10:] == -1).all()


def test_causal_draw_and_invalid_entries():
    rng = np.random.default_rng(1)
    s_q, s_kv, topk = 40, 60, 32
    idx = bench_prefill.draw_indices(rng, s_q, s_kv, topk, causal=True, chunk_elems=200)[:, 0]
    for i, row in enumerate(idx):
        seen = s_kv - s_q + 1 + i  # token i sits at position s_kv - s_q + i
        valid = row[row >= 0]
        assert valid.size == min(seen, topk) == len(set(valid)) and (valid < seen).all()
        assert (row[valid.size:] == -1).all()
    assert sorted(idx[0][idx[0] >= 0]) == list(range(21))  # the first token sees rows 0..20, all of them
    idx = bench_prefill.draw_indices(np.random.default_rng(2), 200, 4096, 128, invalid=0.1)[:, 0]
    share = (idx == -1).mean()
    assert 0.08 < share < 0.12 and ((idx == -1) | ((idx >= 0) & (idx < 4096))).all()


def test_index_draw_never_holds_s_q_by_s_kv(monkeypatch):
    """The draw works in chunks of chunk_elems keys: no array of s_q x s_kv is ever made."""
    made = []
    real = np.random.Generator.random

    class Spy:
        def __init__(self, rng):
            self.rng = rng

        def random(self, size=None, dtype=np.float64):
            made.append(int(np.prod(size)))
            return real(self.rng, size, dtype=dtype)

    bench_prefill.draw_indices(Spy(np.random.default_rng(0)), s_q=64, s_kv=4096, topk=128, chunk_elems=1 << 14)
    assert max(made) <= 1 << 14 and len(made) == 64 * 4096 // (1 << 14)
    assert bench_prefill.check_rows(4096, 64).size == 64 and list(bench_prefill.check_rows(5, 64)) == list(range(5))


def test_side_by_side_refusals_and_a_run_without_flashmla():
    refuse = bench_prefill.flashmla_refusal
    assert "h_q 64 or 128, not 32" in refuse(bench_prefill.PrefillCase("v4", 512, 32, 4096, 8192, 512))
    assert "multiple of 128, not 192" in refuse(bench_prefill.PrefillCase("v4", 512, 64, 4096, 8192, 192))
    # A refused case never reaches FlashMLA (fm here is not a module: touching it would fail).
    rec = bench_prefill.side_by_side(None, object(), bench_prefill.PrefillCase("v4", 512, 16, 8, 64, 32), None,
                                     None, None, None, None, None, 0.1, None)
    assert rec == {"fm_error": "FlashMLA's sparse prefill runs h_q 64 or 128, not 16"}
    report = {}
    fm = mla_bench.open_flashmla(report, 10, 5)
    if fm is None:  # no FlashMLA build (or no torch, or no CUDA) here
        assert report["flashmla"].startswith("not run: ")


def test_summary_against_the_issues_targets():
    rows = [dict(suite="v32", h_q=128, s_kv=8192, topk=2048, fm_over_ours=1.10, cos_diff_vs_flashmla=1e-6,
                 bwd_over_fwd=0.5),
            dict(suite="v4", h_q=64, s_kv=65536, topk=512, fm_over_ours=0.96, cos_diff_vs_flashmla=3e-6,
                 bwd_over_fwd=0.4),
            dict(suite="v4", h_q=64, s_kv=8192, topk=1024, fm_error="FlashMLA failed")]
    lines = bench_prefill.summary_lines({"prefill": rows})
    g = np.sqrt(1.10 * 0.96)
    assert lines[0] == (f"ours vs FlashMLA (FM ms / ours ms, > 1: ours faster): geomean {g:.3f} over 2 rows "
                        "(target >= 1.05: MISSED), worst 0.960 at v4 h_q=64 s_kv=65536 topk=512 (target >= 0.97: "
                        "MISSED); worst cos_diff FM 3.0e-06")
    assert lines[1].startswith(f"backward / forward TFLOPS: geomean {np.sqrt(0.2):.2f}, min 0.40 at v4 h_q=64")
    assert lines[1].endswith("(target >= 0.45: MISSED)")
    assert lines[2] == "FlashMLA not run or failed on 1 rows, first (v4 h_q=64 s_kv=8192 topk=1024): FlashMLA failed"


def test_command_line_runs_on_the_cpu_and_its_json_round_trips(tmp_path, capsys):
    out = tmp_path / "prefill.json"
    assert bench_prefill.main(["--smoke", "--cases", "s_kv=96,topk=40", "--no-trace", "--flashmla", "--causal",
                               "--invalid", "0.1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"env", "settings", "baselines", "prefill", "flashmla", "inputs"} <= set(report)
    assert report["flashmla"].startswith("not run: ")  # no FlashMLA build on a CPU machine
    assert report["baselines"]["matmul"]["tflops"] > 0
    assert [(r["suite"], r["d_qk"], r["topk"]) for r in report["prefill"]] == [("v32", 576, 40), ("v4", 512, 40)]
    for rec in report["prefill"]:
        case = bench_prefill.PrefillCase(**{k: rec[k] for k in ("suite", "d_qk", "h_q", "s_q", "s_kv", "topk")})
        want = bench_prefill.prefill_counts(case, rec["num_valid"])
        assert {k: rec[k] for k in want} == want
        assert 0 < rec["num_valid"] < rec["attended"]  # causal and 10% invalid entries
        assert rec["src"] == "wall" and rec["path"] == "ffi" and rec["attn_sink"] and rec["causal"]
        assert rec["tflops"] == pytest.approx(rec["flops"] / (rec["fwd_ms"] * 1e-3) / 1e12)
        assert rec["bwd_tflops"] == pytest.approx(rec["bwd_flops"] / (rec["bwd_ms"] * 1e-3) / 1e12)
        assert rec["bwd_over_fwd"] == pytest.approx(rec["bwd_tflops"] / rec["tflops"])
        # The timed calls compute the right thing: FlashMLA's out tolerance (cos_diff 7e-6) against
        # the float32 reference, and its lse tolerance scaled to these lse values.
        assert rec["check_tokens"] == 40
        assert rec["cos_diff_vs_reference"] < 7e-6 and rec["dq_cos_diff_vs_reference"] < 7e-6
        assert rec["lse_diff_vs_reference"] < 1e-4
        assert not any(k.startswith("fm_") for k in rec)
    capsys.readouterr()
    assert bench_prefill.main(["--from-json", str(out), "--markdown"]) == 0
    text = capsys.readouterr().out
    assert ("| suite | d_qk | h_q | s_q | s_kv | topk | fwd ms | TFLOPS | FLOP% | bwd ms | bwd TFLOPS | bwd FLOP% | "
            "bwd/fwd | cos_diff | dq cos_diff | src | path |") in text
    assert "| v4 | 512 | 8 | 40 | 96 | 40 |" in text
    assert "up to its causal position" in text and "probability 0.1" in text
    assert "backward / forward TFLOPS: geomean" in text and "against the float32 reference on 40 tokens" in text


def test_the_backward_timed_is_jax_grad_through_the_custom_vjp():
    """The pullback the benchmark times (jax.vjp's, passed into a jitted call) gives jax.grad's dq and dkv."""
    import jax
    import jax.numpy as jnp
    jfm = mla_bench.jfm
    s_q, h_q, d, s_kv, topk = 6, 4, 512, 40, 8
    q = jax.random.normal(jax.random.PRNGKey(0), (s_q, h_q, d), jnp.bfloat16)
    kv = jax.random.normal(jax.random.PRNGKey(1), (s_kv, 1, d), jnp.bfloat16)
    idx = jnp.asarray(bench_prefill.draw_indices(np.random.default_rng(0), s_q, s_kv, topk))
    d_out = jax.random.normal(jax.random.PRNGKey(2), (s_q, h_q, 512), jnp.bfloat16)

    def f(q, kv):
        return jfm.flash_mla_sparse_fwd(q, kv, idx, d ** -0.5)[0]
    _, pullback = jax.jit(lambda q, kv: jax.vjp(f, q, kv))(q, kv)
    dq, dkv = jax.jit(lambda p, g: p(g))(pullback, d_out)
    gq, gkv = jax.grad(lambda q, kv: jnp.sum(f(q, kv).astype(jnp.float32) * d_out.astype(jnp.float32)), (0, 1))(q, kv)
    np.testing.assert_array_equal(np.asarray(dq, np.float32), np.asarray(gq, np.float32))
    np.testing.assert_array_equal(np.asarray(dkv, np.float32), np.asarray(gkv, np.float32))
    assert float(jnp.abs(dkv.astype(jnp.float32)).max()) > 0
