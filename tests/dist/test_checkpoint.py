"""Checkpoints saved under one layout load exactly under another.

The model saved is initialised from SEED; the tensors that load are
filled with NaN first, so every compared value (vocabulary padding rows
included, which loading must zero) has to come from the load.
Expected values are the single-process SEED weights cut with
``shard_tensor`` for the loading rank's coordinates; comparisons are exact.
"""
import os
import signal

import pytest
import torch
import torch.distributed as dist

from mtrain.config.loading import load_config
from mtrain.model.params import ParamMeta, meta, tag
from mtrain.model.sharding import shard_tensor
from mtrain.pipeline.stages import build_chunks, coords_of, unique_parameters
from mtrain.parallel.groups import create_groups
from mtrain.parallel.layout import build_layout
from mtrain.pipeline.schedule_rules import copy_groups
from mtrain.testing import run_distributed
from mtrain.testing.distributed import RankFailure
from mtrain.train import checkpoint_files
from mtrain.train.checkpoint import Checkpointer, find_latest
from mtrain.testing.state import DictState
from mtrain.train.state import TensorState

SEED = 11
TIMEOUT = 45


def save_checkpoint(root, step, tensors, groups, extra, **kwargs):
    return Checkpointer(root, groups, **kwargs).save(step, {"model": TensorState(tensors)}, {"extra": DictState(extra)})


def load_checkpoint(path, tensors, groups=None, **kwargs):
    """Fill ``tensors`` in place; the extra dict this rank gets back."""
    box = DictState()
    Checkpointer(path, groups).load(path, {"model": TensorState(tensors)}, {"extra": box}, **kwargs)
    return box.state


def config(tp=1, ep=1, pp=1, schedule="1f1b", vocab=None):
    overrides = [f"parallel.tp={tp}", f"parallel.ep={ep}", f"parallel.pp={pp}", f"parallel.schedule={schedule}",
                 "parallel.num_microbatches=4"]
    if vocab is not None:
        overrides.append(f"model.vocab_size={vocab}")
    return load_config(overrides)


def _rank_params(cfg, world, seed):
    p = cfg.parallel
    groups = create_groups(build_layout(world, tp=p.tp, ep=p.ep, pp=p.pp, stage_copies=copy_groups(p.schedule, p.pp)), timeout_s=30)
    return groups, unique_parameters(build_chunks(cfg, groups, groups.index("pp"), seed=seed))


def _save_rank(cfg, world, root, step):
    groups, params = _rank_params(cfg, world, SEED)
    handle = save_checkpoint(root, step, params, groups, {"step": step, "rank": dist.get_rank()})
    return str(handle.wait())


def blank(tensors: dict) -> dict:
    with torch.no_grad():
        for t in tensors.values():
            t.fill_(float("nan"))
    return tensors


def _load_rank(cfg, world, path):
    groups, params = _rank_params(cfg, world, SEED)
    blank(params)
    extra = load_checkpoint(path, params, groups)
    return {"coords": coords_of(groups), "extra": extra, "params": {n: p.detach().clone() for n, p in params.items()}}


def full_weights(cfg) -> dict:
    """The single-process model's parameters (tags included)."""
    return unique_parameters(build_chunks(cfg, None, 0, seed=SEED))


def load_single(cfg, path, **kwargs):
    params = blank(full_weights(cfg))
    extra = load_checkpoint(path, params, **kwargs)
    return params, extra


def assert_loaded(loaded: dict, coords, full: dict, who=""):
    assert set(loaded) == set(full)
    for name, value in loaded.items():
        expected = shard_tensor(full[name].detach(), meta(full[name]), coords, name)
        torch.testing.assert_close(value.detach(), expected, rtol=0, atol=0, msg=lambda s: f"{who} {name}: {s}")


def test_tp2_to_tp1(tmp_path):
    path = run_distributed(_save_rank, 2, config(tp=2), 2, tmp_path, 3, timeout=TIMEOUT)[0]
    assert find_latest(tmp_path) == checkpoint_files.step_dir(tmp_path, 3)
    params, extra = load_single(config(), path)
    assert_loaded(params, {}, full_weights(config()))
    # The world size changed, so the extra state is rank 0's.
    assert extra == {"step": 3, "rank": 0}


def test_ep2_dp_to_ep1_and_ep4(tmp_path):
    path = run_distributed(_save_rank, 4, config(ep=2), 4, tmp_path, 1, timeout=TIMEOUT)[0]
    full = full_weights(config())
    params, _ = load_single(config(), path)
    assert_loaded(params, {}, full)
    for rank, res in enumerate(run_distributed(_load_rank, 4, config(ep=4), 4, path, timeout=TIMEOUT)):
        assert_loaded(res["params"], res["coords"], full, f"rank {rank}")
        # Same world size: each rank gets back its own extra state.
        assert res["extra"] == {"step": 1, "rank": rank}


def test_dualpipe_pp2_to_single_chunk(tmp_path):
    cfg = config(pp=2, schedule="dualpipe")
    path = run_distributed(_save_rank, 2, cfg, 2, tmp_path, 1, timeout=TIMEOUT)[0]
    params, _ = load_single(config(), path)
    assert_loaded(params, {}, full_weights(config()))


def test_padded_vocab_tp2_to_tp1_and_back(tmp_path):
    vocab = 1023  # ceil(1023 / 2) = 512 rows per rank; the last row of rank 1 is padding
    full = full_weights(config(vocab=vocab))
    path = run_distributed(_save_rank, 2, config(tp=2, vocab=vocab), 2, tmp_path / "a", 1, timeout=TIMEOUT)[0]
    params, _ = load_single(config(vocab=vocab), path)
    assert params["embed.weight"].shape[0] == vocab
    assert_loaded(params, {}, full)

    back = save_checkpoint(tmp_path / "b", 1, full, None, {"step": 1}).wait()
    for rank, res in enumerate(run_distributed(_load_rank, 2, config(tp=2, vocab=vocab), 2, back, timeout=TIMEOUT)):
        assert res["params"]["embed.weight"].shape[0] == 512
        # assert_loaded also checks that the padding row is zero.
        assert_loaded(res["params"], res["coords"], full, f"rank {rank}")


def _optimizer_states(params: dict, owned: set) -> dict:
    """Stand-in optimizer moments, tagged like their parameters; padding stays zero."""
    out = {}
    for name in sorted(owned):
        state = params[name].detach() * 3
        state.mtrain_meta = meta(params[name])
        out[f"optim.exp_avg.{name}"] = state
    return out


def _save_zero_rank(cfg, world, root):
    groups, params = _rank_params(cfg, world, SEED)
    # ZeRO-1-like: dp rank d passes only the states of every other parameter.
    names = sorted(params)
    owned = {n for i, n in enumerate(names) if i % groups.size("dp") == groups.index("dp")}
    Checkpointer(root, groups).save(1, {"model": TensorState(params),
                                        "optimizer": TensorState(_optimizer_states(params, owned))})


def test_states_passed_by_some_ranks_only(tmp_path):
    run_distributed(_save_zero_rank, 4, config(tp=2), 4, tmp_path, timeout=TIMEOUT)
    cfg = config()
    full = full_weights(cfg)
    params = blank(full_weights(cfg))
    states = blank(_optimizer_states(full_weights(cfg), set(params)))
    checkpointer = Checkpointer(tmp_path)
    checkpointer.load(find_latest(tmp_path), {"model": TensorState(params), "optimizer": TensorState(states)})
    assert_loaded(params, {}, full)
    for name in params:
        torch.testing.assert_close(states[f"optim.exp_avg.{name}"], full[name].detach() * 3, rtol=0, atol=0)

    # A tensor the checkpoint lacks is an error naming it, unless optional.
    bogus = {"optim.exp_avg.not_a_param": torch.zeros(3)}
    with pytest.raises(KeyError, match="optim.exp_avg.not_a_param"):
        checkpointer.load(find_latest(tmp_path), {"optimizer": TensorState(bogus)})
    checkpointer.load(find_latest(tmp_path), {"optimizer": TensorState(bogus)}, optional=["optim.*"])
    assert torch.equal(bogus["optim.exp_avg.not_a_param"], torch.zeros(3))


def _crash_in_second_save(cfg, world, root):
    groups, params = _rank_params(cfg, world, SEED)
    checkpointer = Checkpointer(root, groups)
    model = {"model": TensorState(params)}
    checkpointer.save(1, model, {"extra": DictState({"step": 1})})
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)

    def die(point):
        if point == "written":
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint_files.fault_hook = die
    checkpointer.save(2, model, {"extra": DictState({"step": 2})})


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    with pytest.raises(RankFailure, match="died"):
        run_distributed(_crash_in_second_save, 2, config(tp=2), 2, tmp_path, timeout=TIMEOUT)
    # The data of step 2 is on disk but it was never sealed nor published.
    assert (checkpoint_files.tmp_dir(tmp_path, 2) / ".metadata").is_file()
    assert find_latest(tmp_path) == checkpoint_files.step_dir(tmp_path, 1)
    params, extra = load_single(config(), find_latest(tmp_path))
    assert extra == {"step": 1}
    assert_loaded(params, {}, full_weights(config()))
    # The next save clears the leftover.
    save_checkpoint(tmp_path, 3, params, None, {"step": 3})
    assert not checkpoint_files.tmp_dir(tmp_path, 2).exists()


def _async_save_rank(cfg, world, root):
    groups, params = _rank_params(cfg, world, SEED)
    checkpointer = Checkpointer(root, groups, async_save=True)
    handle = checkpointer.save(5, {"model": TensorState(params)}, {"extra": DictState({"step": 5})})
    # Training goes on while the save is written: the checkpoint must hold the
    # values at the time of the call.
    with torch.no_grad():
        for p in params.values():
            p.mul_(-2.0)
    assert checkpointer.wait() == handle.path
    return str(handle.wait())


def test_async_save_snapshots_the_values(tmp_path):
    path = run_distributed(_async_save_rank, 2, config(tp=2), 2, tmp_path, timeout=TIMEOUT)[0]
    assert find_latest(tmp_path) == checkpoint_files.step_dir(tmp_path, 5) == type(tmp_path)(path)
    params, _ = load_single(config(), path)
    assert_loaded(params, {}, full_weights(config()))


def _expert_tp_rank(root, full):
    groups = create_groups(build_layout(4, ep=2, expert_tp=2), timeout_s=30)
    weight = tag(torch.zeros(0), expert=True, shard_dim=1, shard_group="expert_tp")
    local = tag(shard_tensor(full, meta(weight), coords_of(groups)), expert=True, shard_dim=1,
                shard_group="expert_tp")
    Checkpointer(root, groups).save(1, {"experts": TensorState({"experts.w": local})})
    return coords_of(groups)


def test_expert_weights_split_over_ep_and_expert_tp(tmp_path):
    full = torch.randn(4, 6, 3)
    coords = run_distributed(_expert_tp_rank, 4, tmp_path, full, timeout=TIMEOUT)
    assert sorted((c["ep"][0], c["expert_tp"][0]) for c in coords) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    loaded = {"experts.w": torch.full((4, 6, 3), float("nan"))}
    Checkpointer(tmp_path).load(find_latest(tmp_path), {"experts": TensorState(loaded)},
                                metas={"experts.w": ParamMeta(expert=True, shard_dim=1, shard_group="expert_tp")})
    assert torch.equal(loaded["experts.w"], full)
