"""tools/fp8_vs_bf16.py on a few steps: its table and figures are the numbers
of the two runs' metrics.jsonl, and the two runs differ only in train.fp8."""
import json
import math
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import fp8_vs_bf16  # noqa: E402


def test_the_comparison_reports_its_runs_metrics(tmp_path, capsys):
    png = tmp_path / "curve.png"
    args = ["--steps", "4", "--every", "2", "--window", "3", "--out", str(tmp_path), "--png", str(png),
            "--spread-seed", "99", "train.micro_batch_size=2", "data.seq_len=32"]
    assert fp8_vs_bf16.main(args) == 0
    out = capsys.readouterr().out
    base = fp8_vs_bf16.read_metrics(tmp_path / "baseline")
    fp8 = fp8_vs_bf16.read_metrics(tmp_path / "fp8")
    assert sorted(base) == sorted(fp8) == [1, 2, 3, 4]
    # Same seed and data; only the GEMMs differ: close, not equal.
    assert base[1]["lm_loss"] != fp8[1]["lm_loss"]
    assert abs(fp8[1]["lm_loss"] - base[1]["lm_loss"]) / base[1]["lm_loss"] < 2e-3

    # The CPU baseline is fp32 and says so.
    assert "| step | fp32 baseline loss | FP8 loss | relative difference |" in out
    rows = {int(m[0]): m[1:] for m in re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([-+\d.]+) % \|$", out, re.M)}
    assert sorted(rows) == [1, 2, 4]  # the first, every 2nd and the last step
    for step, (b, f, rel) in rows.items():
        lb, lf = base[step]["lm_loss"], fp8[step]["lm_loss"]
        assert (b, f) == (f"{lb:.4f}", f"{lf:.4f}")
        assert float(rel) == round(100 * (lf - lb) / lb, 2)
    mb = sum(base[s]["lm_loss"] for s in (2, 3, 4)) / 3
    mf = sum(fp8[s]["lm_loss"] for s in (2, 3, 4)) / 3
    summary = re.search(r"mean LM loss over steps 2-4: fp32 baseline ([\d.]+), FP8 ([\d.]+), relative difference "
                        r"([-+\d.]+) %", out)
    assert summary, out
    assert summary.groups() == (f"{mb:.4f}", f"{mf:.4f}", f"{100 * (mf - mb) / mb:+.3f}")
    # The spread line: the baseline with another seed, against the first baseline.
    other = fp8_vs_bf16.read_metrics(tmp_path / "spread")
    mo = sum(other[s]["lm_loss"] for s in (2, 3, 4)) / 3
    spread = re.search(r"fp32 baseline with train.seed=99 against seed \d+: mean LM loss over steps 2-4 ([\d.]+), "
                       r"relative difference ([-+\d.]+) %", out)
    assert spread, out
    assert spread.groups() == (f"{mo:.4f}", f"{100 * (mo - mb) / mb:+.3f}")
    assert other[1]["lm_loss"] != base[1]["lm_loss"]
    walls = re.search(r"wall time: fp32 baseline (\d+) s, FP8 (\d+) s", out)
    assert walls, out
    for run, wall in zip((base, fp8), walls.groups()):  # the whole run: at least its steps
        assert int(wall) >= math.floor(sum(r["step_time_s"] for r in run.values()))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The first record names the GEMMs that ran FP8 (every stage once, over the pipeline ranks).
    firsts = {}
    for run in ("baseline", "fp8"):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert records[1]["fp8_gemms"] is None
        firsts[run] = records[0]
    m = yaml.safe_load((tmp_path / "fp8" / "config.yaml").read_text())["model"]
    moe_layers = m["num_layers"] - m["first_k_dense"] + m["mtp_depth"]
    assert firsts["fp8"]["fp8_gemms"]["routed_experts"] == 3 * moe_layers
    assert firsts["fp8"]["fp8_gemms"]["dispatch_payload"] == moe_layers
    assert firsts["baseline"]["fp8_gemms"] == {}
    assert firsts["baseline"]["high_precision_gemms"]["routed_experts"] == 3 * moe_layers
    assert firsts["fp8"]["high_precision_gemms"]["router"] == moe_layers
