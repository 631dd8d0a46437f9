"""The trainer on one GPU (nccl, bf16, the triton grouped GEMM when present).
Skipped without CUDA."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu


def test_single_gpu_training_runs_and_learns(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "mtrain.cli.train", "parallel=single", "cluster.gpus_per_node=1", "train.steps=20",
           "train.dtype=bf16", "logging.wandb=false", "logging.progress=false", f"run_dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 20
    assert metrics[-1]["lm_loss"] < metrics[0]["lm_loss"]
    assert metrics[-1]["peak_memory_gb"] > 0
