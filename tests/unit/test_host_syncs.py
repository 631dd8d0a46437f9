"""Host synchronisations in the hot path, counted on CPU as they would happen
on a GPU (see mtrain.testing.syncs): at most one per MoE layer per
micro-batch (its row counts), none in the backward, none for logging until
the step's end."""
import pytest
import torch
import torch.distributed as dist

from mtrain.config.loading import load_config
from mtrain.model.model import ModelChunk, initialize
from mtrain.model.moe.dispatch import expert_major_index
from mtrain.model.groups import ModelGroups
from mtrain.model.moe.layer import MoELayer
from mtrain.pipeline.executor import PipelineExecutor
from mtrain.runtime.context import StepContext
from mtrain.testing import run_distributed
from mtrain.testing.syncs import HostSyncCounter


def test_the_counter_sees_reads_copies_and_data_dependent_ops():
    t = torch.tensor([1, 3, 3])
    with HostSyncCounter() as syncs:
        t.sum().item(), float(t[0]), t.tolist(), torch.bincount(t), t.nonzero()
        torch.repeat_interleave(t, t, output_size=7)  # sized on the host: no sync
    assert dict(syncs.by_name) == {"item": 2, "tolist": 1, "bincount.default": 1, "nonzero.default": 1}


@pytest.mark.parametrize("counts", [[[2, 0, 1], [0, 3, 1]], [[0, 0], [0, 0]], [[4], [1], [0]]])
def test_expert_major_index_matches_the_block_by_block_definition(counts):
    counts = torch.tensor(counts)
    sources, experts = counts.shape
    flat = counts.flatten().tolist()
    starts = [sum(flat[:i]) for i in range(len(flat))]
    expected = [starts[s * experts + e] + j for e in range(experts) for s in range(sources)
                for j in range(flat[s * experts + e])]
    assert expert_major_index(counts, sum(flat)).tolist() == expected


def moe_syncs(ep_group=None) -> tuple[int, int]:
    cfg = load_config(["model.aux_loss_alpha=0.01"]).model
    torch.manual_seed(0)
    moe = MoELayer(cfg, ModelGroups(ep=ep_group, dispatcher="alltoall"))
    x = torch.randn(2, 16, cfg.hidden_size, requires_grad=True)
    with HostSyncCounter() as forward:
        y = moe(x, StepContext())
    with HostSyncCounter() as backward:
        y.square().sum().backward()
    return forward.count, backward.count


def test_one_moe_layer_syncs_once_forward_and_never_backward():
    assert moe_syncs() == (1, 0)


def _ep2_worker():
    return moe_syncs(dist.new_group([0, 1]))


def test_expert_parallel_moe_layer_syncs_once_after_the_counts_exchange():
    assert run_distributed(_ep2_worker, 2, timeout=60) == [(1, 0), (1, 0)]


def test_a_pipeline_step_syncs_once_per_moe_layer_and_microbatch_plus_once_for_its_losses():
    cfg = load_config(["model.aux_loss_alpha=0.01"]).model
    model = ModelChunk(cfg, list(range(cfg.num_layers)))
    initialize(model, 0, cfg.init_std)
    n = 3
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(cfg.vocab_size, (1, 16), generator=g),
                "labels": torch.randint(cfg.vocab_size, (1, 16), generator=g)} for _ in range(n)]
    executor = PipelineExecutor("1f1b", 1, 0, n, {(0, 0): model}, [0])
    with HostSyncCounter(where=True) as syncs:
        result = executor.step(batches)
    moe_layers = len(model.moe_layers())
    assert moe_layers == 4 and len(result.losses) == n
    assert syncs.count == moe_layers * n + 1, syncs.sites
