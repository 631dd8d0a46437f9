"""The trainer on one GPU with the GPU defaults (nccl, train.dtype=auto as
bf16, TF32, the triton grouped GEMM when present). Skipped without CUDA."""
import json
import subprocess
import sys

import pytest
import torch

from mtrain.train.metrics import device_peak_tflops

pytestmark = pytest.mark.gpu

# Under pytest.ini's 300 s ceiling, so a slow run fails here with its stderr
# instead of being cut off by pytest-timeout.
RUN_TIMEOUT_S = 270


def test_single_gpu_training_runs_and_learns(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "mtrain.cli.train", "parallel=single", "cluster.gpus_per_node=1", "train.steps=20",
           "logging.wandb=false", "logging.progress=false", f"run_dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-4000:]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 20
    assert metrics[-1]["lm_loss"] < metrics[0]["lm_loss"]
    assert metrics[-1]["peak_memory_gb"] > 0 and metrics[-1]["step_time_s"] > 0
    assert "training in bf16 (train.dtype=auto, backend nccl" in (tmp_path / "logs" / "rank0.log").read_text()
    if device_peak_tflops(torch.cuda.get_device_name(), "bf16") is not None:
        assert metrics[-1]["mfu"] is not None
