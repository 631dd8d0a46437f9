import json
import subprocess
import sys

PLAN = [sys.executable, "-m", "mtrain.cli.plan"]


def run(*args):
    return subprocess.run(PLAN + list(args), capture_output=True, text=True, timeout=120)


def test_json_plan_groups():
    out = run("parallel.tp=2", "parallel.ep=4", "parallel.pp=1", "parallel.schedule=1f1b",
              "cluster.gpus_per_node=8", "output=json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert (plan["world_size"], plan["tp"], plan["ep"], plan["expert_tp"], plan["pp"], plan["dp"]) == (8, 2, 4, 1, 1, 4)
    assert plan["groups"]["expert_dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert plan["errors"] == []


def test_text_plan_shows_stage_placement():
    out = run()
    assert out.returncode == 0, out.stderr
    assert "pp rank 0: stages [0, 1]" in out.stdout and "pp rank 1: stages [1, 0]" in out.stdout


def test_invalid_config_exits_2_naming_fields():
    out = run("parallel.pp=3", "parallel.schedule=dualpipe")
    assert out.returncode == 2
    assert "parallel.pp" in out.stderr and "even" in out.stderr
    assert "not a multiple of parallel.tp * parallel.pp" in out.stderr
    out = run("parallel.pp=3", "output=json")
    assert out.returncode == 2 and len(json.loads(out.stdout)["errors"]) >= 2
