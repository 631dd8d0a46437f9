"""The trainer passes ``parallel.grad_reduce_dtype`` to the gradient sums: on 2
gloo ranks (ep=2, no ZeRO, so the step's traffic is the all-reduce alone)
bf16 halves ``grad_sync_mb`` and the first loss (before any update) is the same."""
from tests.e2e.test_train import train

EP2 = ["parallel.pp=1", "parallel.ep=2", "parallel.schedule=1f1b", "parallel.num_microbatches=2",
       "train.zero1=false", "train.steps=1"]


def test_bf16_gradient_reduction_halves_the_step_traffic(tmp_path):
    fp32 = train(2, EP2, tmp_path / "fp32")[1]
    bf16 = train(2, EP2 + ["parallel.grad_reduce_dtype=bf16"], tmp_path / "bf16")[1]
    assert fp32["grad_sync_mb"] > 0 and bf16["grad_sync_mb"] == fp32["grad_sync_mb"] / 2
    assert bf16["loss"] == fp32["loss"]
    assert abs(bf16["grad_norm"] - fp32["grad_norm"]) <= 1e-2 * fp32["grad_norm"]  # bf16 rounding of the sums
