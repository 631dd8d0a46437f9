"""fp32 main gradients for 16-bit parameters: bf16 training's gradient is the
fp32 sum of the same bf16 micro-batch gradients, deferred W included."""
import torch

from mtrain.config.loading import load_config
from mtrain.model.model import ModelChunk, initialize
from mtrain.runtime.context import StepContext
from mtrain.runtime.runner import ChunkRunner
from mtrain.train.grads import attach_main_grads, main_grad, zero_grads


def bf16_model():
    cfg = load_config([]).model
    model = ModelChunk(cfg, list(range(cfg.num_layers)))
    initialize(model, 1, cfg.init_std)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return cfg, model


def batches(cfg, n):
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(cfg.vocab_size, (2, 17), generator=g) for _ in range(n)]
    return [{"input_ids": i[:, :-1], "labels": i[:, 1:]} for i in ids]


def test_bf16_gradients_accumulate_in_fp32_main_grads():
    cfg, model = bf16_model()
    data = batches(cfg, 3)
    # Reference: every micro-batch's bf16 gradient on its own, summed in fp32.
    expected = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    in_bf16 = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for mb in data:
        model.zero_grad(set_to_none=True)
        model(mb).loss.backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.float()
            in_bf16[n] += p.grad
    model.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    handles = attach_main_grads(params)
    for mb in data:
        model(mb).loss.backward()
    for n, p in params.items():
        assert p.grad is None and main_grad(p).dtype == torch.float32
        assert torch.equal(main_grad(p), expected[n]), n
    # Accumulating the same gradients in bf16 loses bits: the check above tells the two apart.
    assert any(not torch.equal(in_bf16[n].float(), expected[n]) for n in expected)
    zero_grads(params)
    assert all(main_grad(p).abs().sum() == 0 for p in params.values())
    for h in handles:
        h.remove()


def stepwise_main_grads(model, mb, defer: bool) -> dict:
    params = dict(model.named_parameters())
    handles = attach_main_grads(params)
    runner, step = ChunkRunner(model), StepContext()
    runner.forward(0, mb, step=step)
    if defer:
        with step.deferring_weight_grads() as sink:
            runner.backward(0, torch.ones(()))
        assert len(sink) > 0 and all(p.grad is None for p in params.values())
        sink.run()
    else:
        runner.backward(0, torch.ones(()))
    out = {n: main_grad(p).clone() for n, p in params.items()}
    for h in handles:
        h.remove()
    for p in params.values():
        del p.main_grad
    return out


def test_deferred_weight_gradients_land_in_the_main_grads_too():
    cfg, model = bf16_model()
    (mb,) = batches(cfg, 1)
    now = stepwise_main_grads(model, mb, defer=False)
    later = stepwise_main_grads(model, mb, defer=True)
    for n in now:
        assert torch.equal(now[n], later[n]), n


def test_global_grad_norm_is_the_norm_of_every_counted_gradient():
    from mtrain.train.grads import global_grad_norm

    g = torch.Generator().manual_seed(0)
    params = {n: torch.nn.Parameter(torch.zeros(shape)) for n, shape in
              (("a", (3, 4)), ("b", (5,)), ("c", (2, 2)))}
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g)
    counted = {"a", "b"}  # "c" is counted on another rank
    norm = global_grad_norm(params, counted, set(params), None)
    expected = torch.cat([params[n].grad.double().flatten() for n in sorted(counted)]).norm()
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
