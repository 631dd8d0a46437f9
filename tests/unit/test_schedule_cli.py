"""``mtrain-schedule`` (mtrain.cli.schedule:main)."""
from __future__ import annotations

import json

import pytest

from mtrain.cli.schedule import main, parse_costs
from mtrain.pipeline.schedule_rules import SCHEDULE_NAMES
from mtrain.pipeline.schedules import build_schedule
from mtrain.pipeline.instructions import instruction_from_json


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def run_error(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_json_structure(capsys):
    code, out, _ = run(capsys, "--schedule", "dualpipe", "--pp", "4", "--microbatches", "8",
                       "--cost", "F=1,B=2,W=1,FB=2.5", "--json")
    assert code == 0
    data = json.loads(out)  # exactly one JSON object
    assert data["schedule"] == "dualpipe" and data["pp"] == 4 and data["num_microbatches"] == 8
    assert data["makespan"] > 0 and 0 <= data["bubble_ratio"] < 1
    assert data["bubble"] == pytest.approx(1.5)  # (pp/2-1)(FB+B-3W)
    assert [r["rank"] for r in data["ranks"]] == [0, 1, 2, 3]
    for r in data["ranks"]:
        assert set(r) >= {"rank", "busy", "idle", "peak_activations", "ops"}
        assert r["busy"] + r["idle"] == pytest.approx(data["makespan"])
        assert r["peak_activations"] == 5
        ops = [instruction_from_json(o) for o in r["ops"]]
        assert ops == build_schedule("dualpipe", 4, 8, r["rank"])  # execution order
        plain = [o for o in r["ops"] if o["kind"] != "overlap"]
        pairs = [o for o in r["ops"] if o["kind"] == "overlap"]
        assert all("direction" in o for o in plain)
        assert pairs and all(set(p) >= {"kind", "forward", "backward"} for p in pairs)
        starts = [o["start"] for o in r["ops"]]
        assert starts == sorted(starts)


def test_json_without_direction_for_single_direction_schedules(capsys):
    _, out, _ = run(capsys, "--schedule", "1f1b", "--pp", "2", "--microbatches", "3", "--json")
    data = json.loads(out)
    first = data["ranks"][0]["ops"][0]
    assert {k: first[k] for k in ("kind", "stage", "microbatch")} == {"kind": "F", "stage": 0, "microbatch": 0}
    assert "direction" not in first
    assert data["ranks"][0]["idle"] == pytest.approx(3.0)  # (pp-1)(F+B) at default costs


def test_text_summary(capsys):
    code, out, _ = run(capsys, "--schedule", "zb1p", "--pp", "4", "--microbatches", "8")
    assert code == 0
    assert "zb1p" in out and "| rank |" in out
    assert len([l for l in out.splitlines() if l.startswith("| ") and l[2].isdigit()]) == 4


def test_compare_lists_all_four(capsys):
    code, out, _ = run(capsys, "--compare", "--pp", "8", "--microbatches", "20", "--cost", "F=1,B=2,W=1,FB=2.5")
    assert code == 0
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]]
            for l in out.splitlines() if l.startswith("| ") and not l.startswith("| schedule")}
    assert set(rows) == set(SCHEDULE_NAMES)
    # makespan, bubble, bubble %, peak activations, stages, param copies
    assert rows["1f1b"][1] == "21" and rows["zb1p"][1] == "7" and rows["dualpipe"][1] == "4.5"
    assert rows["1f1b"][3] == "8" and rows["dualpipe"][3] == "9"
    assert rows["dualpipe"][5] == "2" and rows["dualpipev"][5] == "1"


def test_compare_skips_with_note(capsys):
    code, out, _ = run(capsys, "--compare", "--pp", "3", "--microbatches", "4")
    assert code == 0
    assert "skipped dualpipe" in out and "skipped dualpipev" in out
    assert "| 1f1b" in out and "| zb1p" in out


@pytest.mark.parametrize("argv,needle", [
    (("--schedule", "dualpipe", "--pp", "3", "--microbatches", "12"), "even --pp"),
    (("--schedule", "dualpipe", "--pp", "4", "--microbatches", "6"), "--microbatches >= 2*pp"),
    (("--schedule", "dualpipev", "--pp", "4", "--microbatches", "7"), "--microbatches >= 2*pp"),
    (("--schedule", "nope",), "not a known schedule"),
    (("--cost", "F=1,B"), "malformed cost"),
    (("--cost", "F=abc"), "not a number"),
    (("--cost", "Q=1"), "unknown cost"),
    (("--cost", "B=1,W=2"), "must not exceed"),
])
def test_bad_arguments_exit_2(capsys, argv, needle):
    code, out, err = run_error(capsys, *argv)
    assert code == 2
    assert needle in err, err
    assert out == ""


def test_png(tmp_path, capsys):
    path = tmp_path / "dp.png"
    code, out, _ = run(capsys, "--schedule", "dualpipe", "--pp", "4", "--microbatches", "8", "--png", str(path))
    assert code == 0
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_parse_costs():
    assert parse_costs("F=1, b=2,W=0.5,FB=2.5") == {"F": 1.0, "B": 2.0, "W": 0.5, "FB": 2.5}
