"""GPU state: device-to-host copies on a side stream into page-locked shm, hooks that wait on the GPU.

Skipped where torch sees no CUDA device (the dev and CI machines); run on a GPU
machine with ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from shardkeep.client import Snapshotter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _snap(daemon, job, **kw) -> Snapshotter:
    return Snapshotter(socket=daemon.socket, job=job, rank=0, world_size=1, **kw)


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().cpu().contiguous().view(-1).view(torch.uint8), b.detach().cpu().contiguous().view(-1).view(torch.uint8))


def _model(width: int, layers: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)],
                                torch.nn.BatchNorm1d(width)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return model, opt


def _train_step(model, opt, x) -> None:
    opt.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


def _clone_state(model, opt) -> dict:
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "opt": [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for s in opt.state.values()]}


def _assert_restored(model, opt, want) -> None:
    for k, v in model.state_dict().items():
        assert v.is_cuda, k
        assert _bitwise(v, want["model"][k]), k
    got = list(opt.state.values())
    assert len(got) == len(want["opt"])
    for g, w in zip(got, want["opt"]):
        for k in w:
            assert _bitwise(g[k], w[k]) if torch.is_tensor(w[k]) else g[k] == w[k], k


def test_gpu_state_round_trips_bitwise_onto_the_gpu(daemon, job_id):
    model, opt = _model(256, 3, seed=1)
    x = torch.randn(64, 256, device="cuda")
    _train_step(model, opt, x)
    # Adam keeps its step counts on the CPU for GPU parameters: a mixed state
    assert any(not s["step"].is_cuda for s in opt.state.values())
    want = _clone_state(model, opt)
    with _snap(daemon, job_id) as snap:
        r = snap.snapshot({"model": model, "opt": opt}, 1).result(timeout=60)
        assert (r.status, r.level) == ("committed", "local")
        assert all(m.page_locked for m in snap._maps._maps.values()), "slots were not page-locked for CUDA"
        for _ in range(3):
            _train_step(model, opt, x)
        fresh_model, fresh_opt = _model(256, 3, seed=2)
        _train_step(fresh_model, fresh_opt, x)  # allocates Adam state to restore into
        assert snap.restore({"model": fresh_model, "opt": fresh_opt}) == 1
        _assert_restored(fresh_model, fresh_opt, want)


def test_optimizer_step_right_after_snapshot_cannot_change_what_is_copied(daemon, job_id):
    """The optimizer pre-hook makes the training stream wait for the copies, not the CPU.

    ~1 GB of parameters and Adam state: the device-to-host copies take tens of
    milliseconds while Adam's kernels take about one, so without the stream wait
    the snapshot would hold (partly) updated values.
    """
    model, opt = _model(4096, 5, seed=3)
    x = torch.randn(256, 4096, device="cuda")
    _train_step(model, opt, x)
    with _snap(daemon, job_id) as snap:
        snap.snapshot({"model": model, "opt": opt}, 1).result(timeout=120)  # slots made and mapped
        for step in (2, 3, 4):
            _train_step(model, opt, x)
            torch.cuda.synchronize()
            want = _clone_state(model, opt)
            fut = snap.snapshot({"model": model, "opt": opt}, step)
            with torch.no_grad():
                opt.step()  # at once: the pre-hook must order these writes after the copies
            assert fut.result(timeout=120).status == "committed"
            torch.cuda.synchronize()
            assert not _bitwise(next(model.parameters()), want["model"]["0.weight"])  # training went on
            fresh_model, fresh_opt = _model(4096, 5, seed=4)
            _train_step(fresh_model, fresh_opt, x)
            assert snap.restore({"model": fresh_model, "opt": fresh_opt}) == step
            _assert_restored(fresh_model, fresh_opt, want)
            del fresh_model, fresh_opt


def test_forward_right_after_snapshot_cannot_change_buffers_being_copied(daemon, job_id):
    model, opt = _model(1024, 2, seed=5)
    x = torch.randn(512, 1024, device="cuda")
    _train_step(model, opt, x)
    with _snap(daemon, job_id) as snap:
        snap.snapshot({"model": model, "opt": opt}, 1).result(timeout=60)
        torch.cuda.synchronize()
        want = _clone_state(model, opt)
        fut = snap.snapshot({"model": model, "opt": opt}, 2)
        model(x * 3 + 1)  # BatchNorm updates its running stats in place, in forward
        assert fut.result(timeout=60).status == "committed"
        fresh_model, fresh_opt = _model(1024, 2, seed=6)
        _train_step(fresh_model, fresh_opt, x)
        assert snap.restore({"model": fresh_model, "opt": fresh_opt}) == 2
        assert _bitwise(fresh_model[-1].running_mean, want["model"]["2.running_mean"])
        assert not _bitwise(model[-1].running_mean, want["model"]["2.running_mean"])


def test_cpu_only_trainer_never_initializes_cuda(daemon, job_id):
    code = textwrap.dedent(f"""
        import torch
        from shardkeep.client import Snapshotter
        m = torch.nn.Linear(64, 64)
        o = torch.optim.Adam(m.parameters())
        m(torch.randn(2, 64)).sum().backward(); o.step()
        with Snapshotter(socket={daemon.socket!r}, job={job_id!r}, rank=0, world_size=1) as s:
            assert s.snapshot({{"m": m, "o": o}}, 1).result(timeout=60).status == "committed"
            assert s.restore({{"m": m, "o": o}}) == 1
        assert not torch.cuda.is_initialized(), "a CPU-only trainer initialized CUDA"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
