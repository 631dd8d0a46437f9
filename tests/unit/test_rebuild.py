"""mtrain/runtime/rebuild.py: outputs dropped after their consumer's forward
and recomputed in place before its backward give the gradients of the plain
computation, hold no memory in between, survive a second backward, and free
themselves with the graph (no reference cycle through autograd)."""
import gc
import weakref

import torch

from mtrain.runtime.rebuild import Rebuilt


def _fn(w):
    def build(a, b):
        return torch.tanh(a @ w), (b * 2).transpose(0, 1)  # a transposed view: storage, not tensor, is refilled
    return build


def _run(rebuild: bool, retain: bool = False):
    torch.manual_seed(0)
    w = torch.randn(8, 8, requires_grad=True)
    a, b = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    if rebuild:
        rebuilt = Rebuilt(_fn(w))
        q, k = rebuilt(a, b)
        consumed = q @ k  # matmul keeps q and k
        rebuilt.release_after(consumed, (q, k))
        held = [q.untyped_storage().nbytes(), k.untyped_storage().nbytes()]
    else:
        q, k = _fn(w)(a, b)
        consumed, held, rebuilt = q @ k, None, None
    loss = (consumed * torch.linspace(-1, 1, 25).view(5, 5)).sum()
    loss.backward(retain_graph=retain)
    grads = [t.grad.clone() for t in (w, a, b)]
    if retain:
        for t in (w, a, b):
            t.grad = None
        loss.backward()
        assert all(torch.equal(g, t.grad) for g, t in zip(grads, (w, a, b)))
    return grads, held, weakref.ref(rebuilt) if rebuilt is not None else None


def test_rebuilt_outputs_give_the_plain_gradients_and_hold_nothing_between():
    plain, _, _ = _run(False)
    rebuilt, held, _ = _run(True)
    assert held == [0, 0]
    assert all(torch.equal(x, y) for x, y in zip(plain, rebuilt))


def test_a_second_backward_rebuilds_again():
    plain, _, _ = _run(False)
    again, _, _ = _run(True, retain=True)
    assert all(torch.equal(x, y) for x, y in zip(plain, again))


def test_the_rebuilt_is_freed_with_its_graph():
    gc.disable()  # freed by reference counting alone: no cycle through the graph
    try:
        _, _, ref = _run(True)
        assert ref() is None
    finally:
        gc.enable()


def test_nothing_requiring_a_gradient_releases_nothing():
    rebuilt = Rebuilt(lambda a: (a * 2,))
    (out,) = rebuilt(torch.ones(3))
    consumed = out * out
    rebuilt.release_after(consumed, (out,))
    assert consumed.grad_fn is None and torch.equal(consumed, torch.full((3,), 4.0))
