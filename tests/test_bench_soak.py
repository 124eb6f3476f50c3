"""``accllm bench soak``: a long functional-model decode through many wraps of the Λ KV ring (here 150
tokens with sink 2 + window 8); memory and cycles per token flat, tokens equal to the fake-quant
torch model's. The package is compiled once into the accllm cache (tiny, about 2 min on 2 cores)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOAK = ["bench", "soak", "--tokens", "150", "--block", "50", "--sink", "2", "--window", "8"]


def test_bench_soak_json():
    r = subprocess.run([sys.executable, "-m", "host.cli", *SOAK, "--json"], capture_output=True, text=True,
                       cwd=REPO, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)                 # the whole stdout is the one document
    assert res["backend"] == "soak" and res["device"] == "emu" and res["model"] == "tiny"
    assert (res["sink"], res["window"], res["decode_tokens"], res["block_tokens"]) == (2, 8, 150, 50)
    assert res["ring_wraps"] > 15
    assert [b["tokens"] for b in res["blocks"]] == [50, 50, 50]
    assert [b["first_token"] for b in res["blocks"]] == [0, 50, 100]
    for b in res["blocks"]:
        assert b["rss_mb"] > 0 and b["cycles_per_token"] > 0 and b["tokens_per_s"] > 0
    assert res["rss_mb_first"] == res["blocks"][0]["rss_mb"] and res["rss_mb_last"] == res["blocks"][-1]["rss_mb"]
    assert res["rss_flat"] and res["rss_growth_mb"] <= res["rss_tolerance_mb"]
    assert res["cycles_flat"] and abs(res["cycles_ratio_last_first"] - 1) <= res["cycles_tolerance"]
    ref = res["reference"]
    n = 1 + res["warmup_tokens"] + 150              # prefill's token, the warm-up steps, the measured steps
    assert ref["tokens_compared"] == n and ref["tokens_disagreeing"] == 0 and ref["first_disagreement"] is None
    assert ref["tokens_agreeing"] + len(ref["near_ties"]) == n
    assert all(t["logit_gap"] <= ref["near_tie_logit"] for t in ref["near_ties"])
    assert res["tokens_match_reference"] and res["passed"]
    assert "block" in r.stderr                       # progress on stderr


def test_bench_soak_fails_when_memory_grows(monkeypatch, capsys):
    """A growing RSS (simulated) fails the run: exit 1, the summary says NOT flat."""
    import host.bench_soak as bs
    from host import cli
    grow = iter(range(0, 10 ** 6, 20))
    monkeypatch.setattr(bs, "rss_mb", lambda: 500.0 + next(grow))
    assert cli.main([*SOAK[:3], "100", "--block", "50", "--sink", "2", "--window", "8", "--reference-tokens", "0",
                     "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "NOT flat" in out and "FAILED" in out and "not run" in out


def test_bench_soak_refuses_a_window_the_run_would_not_wrap(capsys):
    from host import cli
    assert cli.main(["bench", "soak", "--tokens", "10", "--sink", "2", "--window", "8"]) == 2
    assert "would not wrap" in capsys.readouterr().err
