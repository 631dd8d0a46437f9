"""A run starts from a Hugging Face checkpoint (``checkpoint.init_from``) at any layout.

A random ``transformers`` DeepSeek-V3 model saved with ``save_pretrained``
is converted by the trainer itself (rank 0, into ``<run_dir>/hf_import``) and
loaded on 4 gloo ranks with pp=2, ep=2 and DualPipe; the first step's loss
equals transformers' loss on the same global batch, fp32 (rel 1e-5:
summation order differs). The converted checkpoint then starts a 2-rank run
with another layout (pp=1, ep=2) to the same loss.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from mtrain.config.loading import load_config
from tests.e2e.test_train import BASE, DUALPIPE_EP2, train
from tests.hf_models import random_model, save

pytest.importorskip("transformers")

EP2 = ["parallel.pp=1", "parallel.ep=2", "parallel.schedule=1f1b", "parallel.num_microbatches=4"]


def _model_overrides(hf_dir):
    from mtrain.model.hf import model_fields

    fields = model_fields(json.loads((hf_dir / "config.json").read_text()), name="hf")
    assert fields.pop("num_layers") == 4  # BASE sets it
    return [f"model.{k}={v}" for k, v in fields.items()]


def _transformers_loss(hf, overrides):
    """Mean cross-entropy of transformers' logits over the first step's global batch."""
    from mtrain.data.build import build_gpt_dataset
    from mtrain.data.gpt_dataset import StepLoader

    cfg = load_config(BASE + overrides)
    batches = StepLoader(build_gpt_dataset(cfg.data, cfg.model.vocab_size), cfg.train.micro_batch_size, 8, 0,
                         1).next_step()
    with torch.no_grad():
        losses = [F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()) for x, y in batches]
    return torch.stack(losses).mean().item()


def test_first_step_from_hf_checkpoint_matches_transformers(tmp_path):
    hf = random_model(seed=21, vocab_size=1024, num_hidden_layers=4)
    source = save(hf, tmp_path / "hf", max_shard_size="300KB")
    overrides = _model_overrides(source) + ["train.steps=1", "checkpoint.interval=100"]
    expected = _transformers_loss(hf, overrides)

    run = train(4, DUALPIPE_EP2 + overrides + [f"checkpoint.init_from={source}"], tmp_path / "dualpipe")
    assert run[1]["loss"] == pytest.approx(expected, rel=1e-5)
    assert (tmp_path / "dualpipe" / "hf_import" / "latest").is_file()

    converted = tmp_path / "dualpipe" / "hf_import"
    other = train(2, EP2 + overrides + [f"checkpoint.init_from={converted}"], tmp_path / "ep2")
    assert other[1]["loss"] == pytest.approx(expected, rel=1e-5)
