"""The host-made taint of mtrain.testing.devices, without processes."""
import numpy as np
import pytest
import torch
import torch.distributed as dist

from mtrain.testing.devices import DeviceDiscipline, device_discipline

pytestmark = pytest.mark.timeout(60)


def test_factories_without_a_device_are_host_made():
    with device_discipline() as mode:
        made = {
            "tensor": torch.tensor([1.0]), "as_tensor": torch.as_tensor([1, 2]), "zeros": torch.zeros(2),
            "ones": torch.ones((2, 3)), "empty": torch.empty(2), "full": torch.full((2,), 3.0),
            "arange": torch.arange(4), "randn": torch.randn(2, generator=torch.Generator().manual_seed(0)),
            "randint": torch.randint(0, 5, (3,)), "linspace": torch.linspace(0, 1, 3), "eye": torch.eye(2),
            "from_numpy": torch.from_numpy(np.zeros(2)), "cpu string": torch.zeros(2, device="cpu"),
            "device None": torch.zeros(2, device=None),
        }
        placed = {
            "device object": torch.tensor([1.0], device=torch.device("cpu")),
            "zeros on device": torch.zeros(2, device=torch.device("cpu")),
        }
        with torch.device("cpu"):  # the device context fills in device=
            placed["device context"] = torch.zeros(2)
        assert [k for k, t in made.items() if not mode.is_host_made(t)] == []
        assert [k for k, t in placed.items() if mode.is_host_made(t)] == []


def test_ops_inherit_the_mark_only_from_host_made_inputs():
    param = torch.nn.Parameter(torch.ones(1))  # made outside the mode: untagged
    with device_discipline() as mode:
        x = torch.tensor([1.0])
        assert mode.is_host_made(x * 2)
        assert mode.is_host_made(torch.cat([x, x]))
        assert mode.is_host_made(x.view(1, 1))
        assert mode.is_host_made(torch.empty_like(x)) and mode.is_host_made(x.new_zeros(3))
        assert not mode.is_host_made(x + param)
        assert not mode.is_host_made(torch.zeros_like(param))
        assert not mode.is_host_made(torch.empty_like(x, device=torch.device("cpu")))
        assert mode.is_host_made(torch.tensor([param.detach()[0], param.detach()[0]]))  # built from Python data
        assert not mode.is_host_made(torch.as_tensor(param.detach()))  # as_tensor keeps a tensor where it is
        assert mode.is_host_made(param.cpu()) and mode.is_host_made(param.detach().to("cpu"))
        # In place: a clean tensor stays clean, a host-made one stays host-made.
        clean = torch.zeros(1, device=torch.device("cpu"))
        clean.add_(x)
        assert not mode.is_host_made(clean)
        x.copy_(clean)
        assert mode.is_host_made(x)


def test_a_move_to_a_device_clears_the_mark():
    with device_discipline() as mode:
        x = torch.tensor([1.0])
        y = x.to(torch.device("cpu"))  # on CPU the same object: that object is now clean
        assert y is x and not mode.is_host_made(y)
        z = torch.zeros(2)
        assert not mode.is_host_made(z.to(device=torch.device("cpu"), dtype=torch.float64))
        w = torch.zeros(2)
        assert mode.is_host_made(w.to(torch.float64))  # a dtype change stays where it was
        assert not mode.is_host_made(torch.zeros(2).to(torch.zeros(1, device=torch.device("cpu"))))


def test_parameters_and_modules_survive_the_mode():
    with device_discipline() as mode:
        layer = torch.nn.Linear(3, 2)
        assert mode.is_host_made(layer.weight.detach())  # built on the host ...
        layer.to(torch.device("cpu"))
        assert not mode.is_host_made(layer.weight) and not mode.is_host_made(layer(torch.ones(1, 3)))
        layer(torch.ones(1, 3)).sum().backward()
        assert not mode.is_host_made(layer.weight.grad)
    assert layer.weight.grad is not None and "_mtrain" not in str(vars(layer.weight))


def test_marks_leave_with_their_tensors():
    with device_discipline() as mode:
        for _ in range(100):
            torch.zeros(3) * 2
        assert len(mode._host) < 10
        keep = torch.zeros(3)
        assert mode.is_host_made(keep)
    assert mode._host == {}


def test_the_mode_restores_torch_and_does_not_nest():
    def current():
        return (dist.all_reduce, dist.P2POp, dist.new_group, torch.from_numpy, torch.nn.Parameter.__dict__["__new__"])

    real = current()
    with device_discipline():
        assert all(now is not before for now, before in zip(current(), real))
        with pytest.raises(RuntimeError, match="does not nest"):
            with DeviceDiscipline():
                pass
    assert all(now is before for now, before in zip(current(), real))
    assert isinstance(torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter)
