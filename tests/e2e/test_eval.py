"""Held-out evaluation end to end, on forked gloo ranks and through ``mtrain-eval``.

* A fixed checkpoint's eval loss is the same on every layout (bit for bit where
  every micro-batch is computed alike: pp=1, pp=2 1F1B / DualPipe / DualPipeV,
  dp=2; to fp32 round-off where expert or tensor parallelism changes the
  summation order) and equals a single-process forward over the same held-out
  samples; the greedy sample is the same too.
* Evaluating during training changes nothing of training: the same losses,
  gradient norms and expert loads bit for bit as a run without it; parameters,
  router biases and loads, gradients, optimizer state, data position and RNG
  untouched by an evaluation.
* metrics.jsonl holds the eval records; ``mtrain-eval`` on the saved
  checkpoint, at another layout, reproduces the in-training eval loss.
* An evaluation hands collectives only device tensors (as NCCL requires).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtrain.config.loading import load_config
from mtrain.testing import run_distributed
from mtrain.testing.distributed import free_port

BASE = [
    "model.num_layers=4", "train.micro_batch_size=1", "data.seq_len=32", "train.lr=3e-3", "train.warmup_steps=1",
    "logging.wandb=false", "logging.progress=false", "train.collective_timeout_s=60",
    "eval.split=90/5/5", "eval.steps=1", "eval.prompt=def", "eval.sample_tokens=5",
]
# Global batch 8 on every layout, so every layout evaluates the same 8 micro-batches of 1 sample.
LAYOUTS = {
    "pp1": (1, ["parallel.pp=1", "parallel.ep=1", "parallel.schedule=1f1b", "parallel.num_microbatches=8"]),
    "pp2_1f1b": (2, ["parallel.pp=2", "parallel.ep=1", "parallel.schedule=1f1b", "parallel.num_microbatches=8"]),
    "pp2_dualpipe": (2, ["parallel.pp=2", "parallel.ep=1", "parallel.schedule=dualpipe",
                         "parallel.num_microbatches=8"]),
    "pp2_dualpipev": (2, ["parallel.pp=2", "parallel.ep=1", "parallel.schedule=dualpipev",
                          "parallel.num_microbatches=8"]),
    "dp2": (2, ["parallel.pp=1", "parallel.ep=1", "parallel.schedule=1f1b", "parallel.num_microbatches=4"]),
    "ep2": (2, ["parallel.pp=1", "parallel.ep=2", "parallel.schedule=1f1b", "parallel.num_microbatches=4"]),
    "tp2": (2, ["parallel.pp=1", "parallel.tp=2", "parallel.ep=1", "parallel.schedule=1f1b",
                "parallel.num_microbatches=8"]),
    "pp2_dualpipe_ep2": (4, ["parallel.pp=2", "parallel.ep=2", "parallel.schedule=dualpipe",
                             "parallel.num_microbatches=4"]),
}


def _config(overrides, run_dir):
    return load_config(BASE + list(overrides) + [f"run_dir={run_dir}"])


def _train(overrides, run_dir):
    from mtrain.train.trainer import Trainer

    return Trainer(_config(overrides, run_dir), run_dir).run()


def _evaluate(overrides, run_dir):
    from mtrain.cli.eval import run_eval

    return run_eval(_config(overrides, run_dir), run_dir)


def layout(name, *extra):
    world, overrides = LAYOUTS[name]
    return world, overrides + [f"cluster.gpus_per_node={world}", *extra]


def read_records(run_dir):
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Two steps of pp=1 training, saved: (checkpoint directory, its eval record from the end of training)."""
    run_dir = tmp_path_factory.mktemp("trained")
    world, overrides = layout("pp1", "train.steps=2", "checkpoint.interval=2", "checkpoint.resume=none")
    assert run_distributed(_train, world, overrides, str(run_dir), timeout=60) == [0]
    evals = [r for r in read_records(run_dir) if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [2]  # eval.at_end
    return run_dir / "checkpoints" / "step_000002", evals[0]


def hand_computed(ckpt: Path) -> tuple[float, str]:
    """The mean LM loss of the held-out micro-batches and the greedy sample, from
    one process's plain forward of the whole model."""
    from mtrain.data.heldout import build_heldout_dataset, find_tokenizer
    from mtrain.pipeline.stages import build_chunks, unique_parameters
    from mtrain.runtime.context import StepContext
    from mtrain.runtime.program import run_plain
    from mtrain.train.checkpoint import Checkpointer
    from mtrain.train.state import ModelState

    cfg = _config(LAYOUTS["pp1"][1], "unused")
    (model,) = build_chunks(cfg).values()
    Checkpointer(ckpt).load(ckpt, {"model": ModelState(unique_parameters({(0, 0): model}), [model])})
    model.eval()
    held = build_heldout_dataset(cfg.data, cfg.eval, cfg.model.vocab_size)
    losses = []
    with torch.no_grad():
        for g in range(8):  # eval.steps=1 global batch of 8 samples, one per micro-batch
            x, y = held[g]
            losses.append(model({"input_ids": x[None], "labels": y[None]}).lm_loss.double().item())
        tokenizer, _ = find_tokenizer(cfg.data, cfg.model.vocab_size)
        ids = tokenizer.encode("def")
        out = []
        for _ in range(5):
            batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([ids])}
            final = run_plain(model.program(greedy=True).steps, model.initial_carry(batch, None), StepContext())
            token = int(final.next_ids[0, -1])
            if token == tokenizer.eos_id:
                break
            ids, out = ids + [token], out + [token]
    return sum(losses) / len(losses), tokenizer.decode(out)


def evaluate_on(name: str, ckpt: Path, run_dir: Path) -> dict:
    world, overrides = layout(name, f"checkpoint.resume={ckpt}")
    records = run_distributed(_evaluate, world, overrides, str(run_dir), timeout=60)
    timeless = [{k: v for k, v in r.items() if k != "eval_time_s"} for r in records]
    assert all(r == timeless[0] for r in timeless[1:])  # every rank returns the same record
    return records[0]


def test_eval_loss_of_a_checkpoint_same_on_pipeline_layouts_and_by_hand(checkpoint, tmp_path):
    ckpt, in_training = checkpoint
    loss, completion = hand_computed(ckpt)
    assert in_training["lm_loss"] == loss and in_training["sample"]["completion"] == completion
    assert in_training["samples"] == 8 and in_training["tokens"] == 8 * 32
    for name in ("pp1", "pp2_1f1b", "pp2_dualpipe", "pp2_dualpipev", "dp2"):
        record = evaluate_on(name, ckpt, tmp_path / name)
        assert record["step"] == 2 and record["checkpoint"] == str(ckpt)
        assert record["lm_loss"] == loss, name  # bit for bit
        assert record["mtp_loss"] == in_training["mtp_loss"], name
        assert record["sample"]["completion"] == completion, name


def test_eval_loss_of_a_checkpoint_with_expert_and_tensor_parallelism(checkpoint, tmp_path):
    ckpt, in_training = checkpoint
    for name in ("ep2", "tp2", "pp2_dualpipe_ep2"):
        record = evaluate_on(name, ckpt, tmp_path / name)
        assert record["lm_loss"] == pytest.approx(in_training["lm_loss"], rel=1e-6, abs=0), name
        assert record["mtp_loss"] == pytest.approx(in_training["mtp_loss"], rel=1e-6, abs=0), name


DUALPIPE = ["parallel.pp=2", "parallel.ep=1", "parallel.schedule=dualpipe", "parallel.num_microbatches=4",
            "cluster.gpus_per_node=2", "train.steps=4", "checkpoint.interval=4", "checkpoint.resume=none"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """pp=2 DualPipe, 4 steps, with an evaluation every 2 steps and without any."""
    out = {}
    for name, extra in (("with", ["eval.interval=2"]), ("without", ["eval.interval=0", "eval.at_end=false"])):
        run_dir = tmp_path_factory.mktemp(name)
        assert run_distributed(_train, 2, DUALPIPE + extra, str(run_dir), timeout=60) == [0, 0]
        out[name] = run_dir
    return out


def test_evaluating_changes_nothing_of_training(runs):
    with_eval, without = (read_records(runs[k]) for k in ("with", "without"))
    assert [(r["step"], r.get("kind")) for r in with_eval] == [
        (1, None), (2, None), (2, "eval"), (3, None), (4, None), (4, "eval")]  # step 4: once, though at_end too
    assert all(r.get("kind") is None for r in without)
    steps = [r for r in with_eval if r.get("kind") is None]
    for a, b in zip(steps, without, strict=True):
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm", "expert_load_imbalance_per_layer"):
            assert a[key] == b[key], (a["step"], key)


def _state_around_an_evaluation(overrides, run_dir):
    from mtrain.model.moe.layer import MoELayer
    from mtrain.train.trainer import Trainer

    trainer = Trainer(_config(overrides, run_dir), run_dir)
    trainer.train_step()

    def snapshot():
        tensors = {f"{key}:{name}": t.detach().clone() for key, chunk in trainer.chunks.items()
                   for name, t in list(chunk.named_parameters()) + list(chunk.named_buffers())}
        grads = {name: None if p.grad is None else p.grad.clone() for name, p in trainer.params.items()}
        optimizer = {f"{n}.{k}": v.clone() for n, s in trainer.optimizer.state.items() for k, v in s.items()}
        return tensors, grads, optimizer, trainer.loader.state_dict(), torch.get_rng_state(), trainer.step

    before = snapshot()
    record = trainer.evaluate()
    after = snapshot()
    same = [all(torch.equal(a[k], b[k]) if a[k] is not None else b[k] is None for k in a)
            for a, b in zip(before[:3], after[:3])]
    modes = {m.training for chunk in trainer.chunks.values() for m in chunk.modules()}
    loads = [float(m.router.load.abs().sum()) for c in trainer.chunks.values() for m in c.modules()
             if isinstance(m, MoELayer)]
    return {"same": same, "data": before[3] == after[3], "rng": torch.equal(before[4], after[4]),
            "step": before[5] == after[5], "modes": modes, "loads": loads, "lm_loss": record["lm_loss"]}


def test_an_evaluation_touches_no_training_state(tmp_path):
    results = run_distributed(_state_around_an_evaluation, 2, DUALPIPE, str(tmp_path), timeout=60)
    for rank, r in enumerate(results):
        assert r["same"] == [True, True, True], rank  # parameters and buffers, gradients, optimizer state
        assert r["data"] and r["rng"] and r["step"], rank
        assert r["modes"] == {True}, rank  # back in training mode
        assert r["loads"] and not any(r["loads"]), rank  # routers counted nothing (cleared after the step)
        assert r["lm_loss"] == results[0]["lm_loss"]


def test_mtrain_eval_reproduces_the_in_training_eval(runs, tmp_path):
    in_training = [r for r in read_records(runs["with"]) if r.get("kind") == "eval" and r["step"] == 4][0]
    ckpt = runs["with"] / "checkpoints" / "step_000004"
    # One thread, as the forked ranks run: kernels split over threads may sum in another order.
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    # One process, pp=1, the same global batch of 4 as the DualPipe run (2 directions x 2 micro-batches).
    pp1 = ["parallel.pp=1", "parallel.ep=1", "parallel.schedule=1f1b", "parallel.num_microbatches=4"]
    cmd = [sys.executable, "-m", "mtrain.cli.eval", *BASE, *pp1, "cluster.gpus_per_node=1",
           f"checkpoint.resume={ckpt}", f"run_dir={tmp_path}", "output=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    (saved,) = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert printed == saved
    assert saved["checkpoint"] == str(ckpt) and saved["step"] == 4
    assert saved["lm_loss"] == in_training["lm_loss"]  # pp=2 DualPipe in training, pp=1 here: the same bits
    assert saved["sample"] == in_training["sample"]


def test_mtrain_eval_without_held_out_data_names_the_fix(tmp_path):
    cmd = [sys.executable, "-m", "mtrain.cli.eval", "parallel=single", "cluster.gpus_per_node=1",
           "checkpoint.resume=none", f"run_dir={tmp_path}", "logging.wandb=false"]
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    assert "nothing is held out to evaluate: set eval.split=98/1/1" in out.stderr


def _evaluate_under_device_discipline(overrides, run_dir):
    from mtrain.testing.devices import device_discipline
    from mtrain.train.trainer import Trainer

    with device_discipline(collect=True) as mode:
        record = Trainer(_config(overrides, run_dir), run_dir).evaluate()
    return [v.message() for v in mode.violations], dict(mode.checked), record["sample"]["tokens"]


@pytest.mark.parametrize("name", ["tp2", "pp2_dualpipe"])
def test_an_evaluation_hands_collectives_only_device_tensors(name, tmp_path):
    """As NCCL would require: the loss sums, the greedy token and the vocab-parallel argmax."""
    world, overrides = layout(name, "checkpoint.resume=none")
    results = run_distributed(_evaluate_under_device_discipline, world, overrides, str(tmp_path), timeout=60)
    assert [r[0] for r in results] == [[]] * world, "\n".join(v for r in results for v in r[0])
    assert results[0][1]["all_reduce"] > 0 and results[0][2] > 0
