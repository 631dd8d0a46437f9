"""ZeroAdamW on one rank against torch.optim.AdamW (decoupled weight decay on
matrices only), over several steps, fp32 and with bf16 weights."""
import pytest
import torch
from omegaconf import OmegaConf

from mtrain.train.grads import attach_main_grads
from mtrain.train.optimizer import ZeroAdamW

TRAIN = OmegaConf.create({"beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1})


def params(dtype):
    g = torch.Generator().manual_seed(0)
    return {"w": torch.nn.Parameter(torch.randn(8, 4, generator=g).to(dtype)),
            "b": torch.nn.Parameter(torch.randn(4, generator=g).to(dtype))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_updates_follow_adamw(dtype):
    mine = params(dtype)
    attach_main_grads(mine)
    ref = {n: torch.nn.Parameter(p.detach().float().clone()) for n, p in mine.items()}
    opt = ZeroAdamW(mine, None, TRAIN)
    torch_opt = torch.optim.AdamW([{"params": [ref["w"]], "weight_decay": 0.1},
                                   {"params": [ref["b"]], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        torch_opt.zero_grad()
        for n, p in mine.items():
            grad = torch.randn(p.shape, generator=g)
            (p * grad.to(dtype)).sum().backward()
            ref[n].grad = grad.to(dtype).float()
        opt.step(1e-2)
        torch_opt.step()
    for n in mine:
        master = opt.state[n]["master"]
        torch.testing.assert_close(master, ref[n].detach(), rtol=1e-5, atol=1e-6, msg=n)
        assert torch.equal(mine[n].detach(), master.to(dtype))  # the weights are the rounded masters
