"""A Hydra sweep (``mtrain-train -m``) of the real config tree: every job runs
in its own folder, which is both Hydra's output folder and the trainer's
run_dir, and the same command again resumes each job from its own checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

TINY = ["parallel=single", "cluster.gpus_per_node=1", "model.num_layers=2", "data.seq_len=32",
        "train.micro_batch_size=1", "logging.wandb=false", "logging.progress=false", "train.warmup_steps=1"]


def sweep(cwd: Path, steps: int) -> None:
    cmd = [sys.executable, "-m", "mtrain.cli.train", "-m", "train.lr=1e-3,3e-3", *TINY, f"train.steps={steps}",
           "run_dir=runs/lr-sweep"]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_each_sweep_job_has_its_own_run_dir_and_resumes_from_it(tmp_path):
    sweep(tmp_path, steps=1)
    root = tmp_path / "runs" / "lr-sweep"
    assert (root / "multirun.yaml").exists()
    jobs = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job, lr in (("0", 1e-3), ("1", 3e-3)):
        folder = root / job
        # Hydra's record of the job and the trainer's output share the folder.
        assert "train.lr=" + ("0.001" if lr == 1e-3 else "0.003") in (folder / ".hydra" / "overrides.yaml").read_text()
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert Path(saved["run_dir"]) == folder and saved["train"]["lr"] == lr
        assert (folder / "checkpoints" / "step_000001").is_dir()
        assert (folder / "logs" / "rank0.log").exists()
        assert [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (root / "checkpoints").exists() and not (tmp_path / "multirun").exists()
    first_lr = [json.loads((root / job / "metrics.jsonl").read_text())["lr"] for job in ("0", "1")]
    assert first_lr[1] / first_lr[0] == 3.0  # the warm-up step of each job's own schedule

    sweep(tmp_path, steps=2)  # the same sweep, one step further: each job continues its own run
    for job in ("0", "1"):
        folder = root / job
        log = (folder / "logs" / "rank0.log").read_text()
        assert f"resumed from {folder / 'checkpoints' / 'step_000001'} at step 1" in log
        steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2]
        assert (folder / "checkpoints" / "step_000002").is_dir()
