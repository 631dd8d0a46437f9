"""Collectives under mtrain.testing.devices.device_discipline on gloo ranks,
as if the default group were NCCL: host-made tensors are refused naming the
collective and the call site, tensors made on the collective device pass,
and a short training run (ZeRO, expert all-to-all, losses, norm, router
loads, checkpoint, stop and requeue agreement) hands none to a collective."""
import signal
import time

import pytest
import torch
import torch.distributed as dist

from mtrain.config.loading import load_config
from mtrain.testing import run_distributed
from mtrain.testing.devices import DeviceDisciplineError, device_discipline

pytestmark = pytest.mark.timeout(120)


def _refused(fn) -> str:
    try:
        fn()
    except DeviceDisciplineError as e:
        return str(e)
    return ""


def _collectives():
    from mtrain.parallel.groups import collective_device
    from mtrain.model.tp import _all_reduce

    rank, out = dist.get_rank(), {}
    with device_discipline():
        device = collective_device()
        placed = torch.tensor([1.0], device=device)
        dist.all_reduce(placed)
        dist.broadcast(torch.zeros(2, device=device), src=0)
        parts = [torch.empty_like(placed) for _ in range(2)]
        dist.all_gather(parts, placed * 2)
        out["placed"] = placed.item()
        out["direct"] = _refused(lambda: dist.all_reduce(torch.tensor([1.0])))
        out["through mtrain"] = _refused(lambda: _all_reduce(torch.ones(2), None))
        out["gather list"] = _refused(lambda: dist.all_gather([torch.zeros(1), torch.zeros(1)], placed))
        # A group asked for gloo takes CPU tensors; one inheriting the default does not.
        gloo = dist.new_group(backend="gloo")
        plain = dist.new_group()
        dist.all_reduce(torch.tensor([1.0]), group=gloo)
        out["plain group"] = _refused(lambda: dist.all_reduce(torch.tensor([1.0]), group=plain))
    with device_discipline(device_bound=None):  # as the real backend says: gloo takes the host's tensors
        dist.all_reduce(torch.tensor([1.0]))
    # Point to point through P2POp (the real isend/irecv inside), listed, not raised.
    with device_discipline(collect=True) as mode:
        peer = 1 - rank
        buffer = torch.zeros(2) if rank == 1 else torch.zeros(2, device=device)
        op = dist.isend if rank == 0 else dist.irecv
        source = torch.full((2,), 7.0, device=device)
        for work in dist.batch_isend_irecv([dist.P2POp(op, source if rank == 0 else buffer, peer)]):
            work.wait()
        out["received"] = buffer.tolist()
        out["p2p"] = [v.message() for v in mode.violations]
    return out


def test_host_made_tensors_are_refused_and_placed_ones_pass():
    start = time.monotonic()
    results = run_distributed(_collectives, 2, timeout=60)
    for rank, out in enumerate(results):
        assert out["placed"] == 2.0
        assert out["direct"].startswith(f"rank {rank}: all_reduce(tensor=...) on the default group (gloo, 2 ranks)")
        assert "tests/dist/test_device_discipline.py" in out["direct"]  # no mtrain frame: the caller
        assert "device=collective_device(group)" in out["direct"]
        assert "mtrain/model/tp.py" in out["through mtrain"] and "in _all_reduce" in out["through mtrain"]
        assert "all_gather(tensor_list[0]=...)" in out["gather list"] and "tensor_list[1]" in out["gather list"]
        assert "group of ranks [0, 1]" in out["plain group"]
    assert results[1]["received"] == [7.0, 7.0]
    assert results[0]["p2p"] == []
    assert len(results[1]["p2p"]) == 1 and "batch_isend_irecv(p2p_op_list[0].tensor (irecv)=...)" in results[1]["p2p"][0]
    assert time.monotonic() - start < 60


BASE = [
    "model.num_layers=3", "train.micro_batch_size=1", "data.seq_len=16", "train.lr=3e-3",
    "train.warmup_steps=1", "logging.wandb=false", "logging.progress=false", "train.collective_timeout_s=50",
    "cluster.gpus_per_node=2", "train.steps=3", "checkpoint.interval=2",
]
LAYOUTS = {
    # dp=2: ZeRO reduce-scatter/all-gather, expert all-to-all over ep=2.
    "ep2_zero": ["parallel.pp=1", "parallel.ep=2", "parallel.schedule=1f1b", "parallel.num_microbatches=2"],
    # Pipeline point to point, the stage-copy sums.
    "pp2_dualpipe": ["parallel.pp=2", "parallel.ep=1", "parallel.schedule=dualpipe", "parallel.num_microbatches=4"],
    # Tensor parallel and expert width split.
    "etp2": ["parallel.pp=1", "parallel.tp=2", "parallel.ep=1", "parallel.expert_tp=2", "parallel.schedule=1f1b",
             "parallel.num_microbatches=2"],
}


def _train(overrides, run_dir):
    from mtrain.launch import requeue
    from mtrain.train.trainer import Trainer

    cfg = load_config(BASE + list(overrides) + [f"run_dir={run_dir}"])
    rank = dist.get_rank()
    with device_discipline(collect=True) as mode:
        code = Trainer(cfg, run_dir).run()
        # Rank 1 got the requeue warning: every rank agrees on it, rank 0 requeues, all leave.
        agreed = requeue.agreed_stop_signal(signal.SIGUSR1 if rank == 1 else None)
        requeue.requeue_job = lambda job_id, timeout_s=60.0: None
        try:
            requeue.requeue_if_warned(agreed, {"SLURM_JOB_ID": "7"})
            left = False
        except SystemExit:
            left = True
    return code, agreed, left, [v.message() for v in mode.violations], dict(mode.checked)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_training_run_hands_collectives_only_device_tensors(tmp_path, layout):
    results = run_distributed(_train, 2, LAYOUTS[layout], str(tmp_path), timeout=90)
    assert [r[3] for r in results] == [[], []], "\n".join(v for r in results for v in r[3])
    assert [r[:3] for r in results] == [(0, signal.SIGUSR1, True)] * 2
    assert (tmp_path / "checkpoints" / "latest").exists()
    checked = results[0][4]
    assert checked["all_reduce"] > 0 and checked["broadcast"] == 1, checked
    assert {"ep2_zero": "all_to_all_single", "pp2_dualpipe": "batch_isend_irecv", "etp2": "all_gather"}[layout] in checked
    if layout == "ep2_zero":
        assert checked["reduce_scatter_single"] > 0 and checked["all_gather_single"] > 0, checked
