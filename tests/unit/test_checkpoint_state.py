"""The checkpointed components: each is a ``Stateful`` whose state round-trips,
directly and through a checkpoint, single process."""
import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.stateful import Stateful

from mtrain.config.loading import load_config
from mtrain.data import GPTDataset, IndexedDataset, IndexedDatasetWriter, StepLoader
from mtrain.pipeline.stages import build_chunks, unique_parameters
from mtrain.train.checkpoint import Checkpointer
from mtrain.train.lr import LRSchedule
from mtrain.train.optimizer import ZeroAdamW
from mtrain.train.state import ModelState, Progress, RNGState, TensorState

CFG = ["model.num_layers=2"]


def model(seed, dtype=torch.float32):
    chunks = build_chunks(load_config(CFG), None, 0, seed=seed)
    params = unique_parameters(chunks)
    for p in params.values():
        p.data = p.data.to(dtype)
    return chunks, params


def trained_optimizer(params, steps=2, seed=0):
    optimizer = ZeroAdamW(params, None, load_config(CFG).train)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        optimizer.step(1e-3)
    return optimizer


def loader(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d", 500) as writer:
        for doc in np.random.default_rng(0).integers(0, 500, size=(20, 30)):
            writer.add_document(doc)
    return StepLoader(GPTDataset(IndexedDataset(tmp_path / "d"), 8, 3), micro_batch=2, num_microbatches=2,
                      dp_rank=0, dp_size=1)


def assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_components_are_stateful(tmp_path):
    chunks, params = model(1)
    components = [ModelState(params, chunks.values()), ZeroAdamW(params, None, load_config(CFG).train),
                  loader(tmp_path), LRSchedule(load_config(CFG).train), RNGState("cpu", 1), Progress(),
                  TensorState({})]
    for component in components:
        assert isinstance(component, Stateful), type(component).__name__


def test_model_state_round_trips_with_router_biases():
    chunks, params = model(1)
    source = ModelState(params, chunks.values())
    biases = [name for name in source.state_dict() if name.endswith("expert_bias")]
    assert biases and not set(biases) & set(params)
    with torch.no_grad():
        for name in biases:
            source.state_dict()[name].add_(0.5)
    other_chunks, _ = model(2)
    target = ModelState(unique_parameters(other_chunks), other_chunks.values())
    target.load_state_dict(source.state_dict())
    assert_same_tensors(target.state_dict(), source.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_round_trips_and_rederives_the_weights(dtype):
    _, params = model(1, dtype)
    source = trained_optimizer(params)
    state = source.state_dict()
    assert int(state["optim.step"]) == 2
    assert any(k.startswith("optim.master.") for k in state) == (dtype == torch.bfloat16)

    _, other = model(2, dtype)
    target = ZeroAdamW(other, None, load_config(CFG).train)
    if dtype == torch.float32:  # the fp32 master is the weight itself: the model state carries it
        TensorState(other).load_state_dict(params)
    target.load_state_dict(state)
    assert target.step_count == 2
    assert_same_tensors(target.state_dict(), state)
    # bf16: the weights come from the loaded fp32 masters.
    assert_same_tensors(other, params)
    # Both go on identically.
    for opt, ps in ((source, params), (target, other)):
        for p in ps.values():
            p.grad = torch.ones_like(p)
        opt.step(1e-3)
    assert_same_tensors(other, params)


def test_step_loader_round_trips(tmp_path):
    source, target = loader(tmp_path), loader(tmp_path)
    source.next_step()
    target.load_state_dict(source.state_dict())
    for (xa, ya), (xb, yb) in zip(source.next_step(), target.next_step()):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_lr_schedule_round_trips():
    schedule = LRSchedule(load_config(CFG).train)
    assert LRSchedule(load_config(CFG).train).load_state_dict(schedule.state_dict()) == []


def test_rng_state_round_trips_at_the_same_world_size_only():
    rng = RNGState("cpu", world_size=2)
    state = rng.state_dict()
    drawn = torch.rand(4)
    rng.load_state_dict(state)
    assert torch.equal(torch.rand(4), drawn)
    # Another world size: the generators are left as they are.
    before = torch.get_rng_state()
    RNGState("cpu", world_size=4).load_state_dict(state)
    assert torch.equal(torch.get_rng_state(), before)


def test_progress_round_trips():
    target = Progress()
    target.load_state_dict(Progress(7).state_dict())
    assert target.step == 7


def test_all_components_round_trip_through_a_checkpoint(tmp_path):
    chunks, params = model(1, torch.bfloat16)
    optimizer = trained_optimizer(params)
    data = loader(tmp_path)
    data.next_step()
    torch.manual_seed(5)
    checkpointer = Checkpointer(tmp_path / "ckpt")
    path = checkpointer.save(3, {"model": ModelState(params, chunks.values()), "optimizer": optimizer},
                             {"progress": Progress(3), "data": data, "lr": LRSchedule(load_config(CFG).train),
                              "rng": RNGState("cpu", 1)}).wait()
    drawn = torch.rand(4)

    other_chunks, other = model(2, torch.bfloat16)
    other_optimizer = ZeroAdamW(other, None, load_config(CFG).train)
    other_data, progress = loader(tmp_path), Progress()
    checkpointer.load(path, {"model": ModelState(other, other_chunks.values()), "optimizer": other_optimizer},
                      {"progress": progress, "data": other_data, "lr": LRSchedule(load_config(CFG).train),
                       "rng": RNGState("cpu", 1)})
    assert progress.step == 3 and other_optimizer.step_count == 2
    assert_same_tensors(ModelState(other, other_chunks.values()).state_dict(),
                        ModelState(params, chunks.values()).state_dict())
    assert_same_tensors(other_optimizer.state_dict(), optimizer.state_dict())
    assert other_data.state_dict() == data.state_dict()
    assert torch.equal(torch.rand(4), drawn)


def test_components_must_not_share_names_and_per_rank_state_must_exist(tmp_path):
    w = torch.ones(3)
    checkpointer = Checkpointer(tmp_path)
    with pytest.raises(ValueError, match="both sharded components 'a' and 'b'"):
        checkpointer.save(1, {"a": TensorState({"w": w}), "b": TensorState({"w": w})})
    path = checkpointer.save(1, {"a": TensorState({"w": w})}, {"progress": Progress(1)}).wait()
    with pytest.raises(KeyError, match="per-rank state of rng"):
        checkpointer.load(path, {"a": TensorState({"w": w})}, {"progress": Progress(), "rng": RNGState("cpu", 1)})
    progress = Progress()
    checkpointer.load(path, {"a": TensorState({"w": w})}, {"progress": progress, "rng": RNGState("cpu", 1)},
                      optional=["rng"])
    assert progress.step == 1
