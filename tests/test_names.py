"""The persist tier and `shardkeep export` name things as `get_state_dict` does (DESIGN.md, persist layout):
an optimizer's state by parameter FQN, a module's keys without DDP's, torch.compile's or activation
checkpointing's wrapper segments.  Checked against torch's own `get_state_dict` on the same objects."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.state_dict import get_state_dict

from shardkeep.client.export import materialize
from shardkeep.client.flatten import canonical_key, flatten, wrapper_paths


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
        self.head = torch.nn.Linear(8, 3)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x):
        return self.head(self.enc(x)) * self.scale


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    model(x).sum().backward()
    opt.step()


def _as_persisted(state: dict) -> dict:
    """What export/persist hand DCP for ``state``: the snapshot's skeleton, materialized."""
    flat = flatten(state, None)
    return materialize(flat.skeleton, dict(enumerate(flat.tensors)), 0, {}, {}, None)


def _check(model: torch.nn.Module, opt: torch.optim.Optimizer, inner: torch.nn.Module) -> None:
    _train(model, opt)
    ours = _as_persisted({"model": model, "optim": opt})
    msd, osd = get_state_dict(model, opt)
    want, _ = flatten_state_dict({"model": msd, "optim": osd})
    got, _ = flatten_state_dict(ours)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), k
        else:
            assert got[k] == v, k
    # the index order is the optimizer's: parameter i of opt.state_dict() is named after that parameter
    names = {id(p): n for n, p in inner.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    assert ours["optim"]["param_groups"][0]["params"] == order[:len(opt.param_groups[0]["params"])]


def test_plain_module_and_two_param_groups():
    torch.manual_seed(0)
    model = Net()
    # groups in another order than named_parameters(): the names follow the optimizer's indices
    opt = torch.optim.AdamW([{"params": list(model.head.parameters())},
                             {"params": list(model.enc.parameters()), "lr": 1e-3}])
    _check(model, opt, model)


def test_torch_compile_and_checkpoint_wrappers_are_left_out():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    torch.manual_seed(0)
    net = Net()
    net.enc = checkpoint_wrapper(net.enc)
    model = torch.compile(net)  # an OptimizedModule wrapper: "_orig_mod." in its state_dict keys
    assert all(k.startswith("_orig_mod.") for k in model.state_dict())
    # the checkpoint wrapper hides its segment from state_dict() keys, not from named_parameters()
    assert any("._checkpoint_wrapped_module." in k for k, _ in model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert wrapper_paths(model) == ["_orig_mod.enc._checkpoint_wrapped_module", "_orig_mod"]
    net.forward = Net.forward.__get__(net)  # run eagerly: nothing here needs the compiler
    _train(net, opt)
    ours = _as_persisted({"model": model, "optim": opt})
    msd, osd = get_state_dict(model, opt)
    assert sorted(ours["model"]) == sorted(msd) and "enc.0.weight" in msd
    assert sorted(ours["optim"]["state"]) == sorted(osd["state"])


def test_ddp_module_prefix_is_left_out(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        inner = Net()
        model = torch.nn.parallel.DistributedDataParallel(inner)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        _check(model, opt, inner)
        assert all(not k.startswith("module.") for k in _as_persisted({"model": model})["model"])
    finally:
        dist.destroy_process_group()


def test_a_parameter_in_no_module_of_the_state_keeps_the_indices():
    torch.manual_seed(0)
    model, extra = Net(), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD(list(model.parameters()) + [extra], lr=0.1, momentum=0.9)
    _train(model, opt)
    extra.grad = torch.ones(3)
    opt.step()
    ours = _as_persisted({"model": model, "optim": opt})
    assert sorted(ours["optim"]["state"]) == list(range(len(opt.state)))


@pytest.mark.parametrize("key,wrappers,want", [
    ("module.fc.weight", ["module"], "fc.weight"),
    ("module._orig_mod.fc.weight", ["module._orig_mod", "module"], "fc.weight"),
    ("modulex.fc.weight", ["module"], "modulex.fc.weight"),
    ("a._checkpoint_wrapped_module.0.bias", ["a._checkpoint_wrapped_module"], "a.0.bias"),
])
def test_canonical_key(key, wrappers, want):
    assert canonical_key(key, wrappers) == want
