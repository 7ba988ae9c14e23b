"""Snapshot and restore through a real daemon, in one trainer process."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from shardkeep.client import CapacityError, Snapshotter, UnavailableError


def _snap(daemon, job, **kw) -> Snapshotter:
    return Snapshotter(socket=daemon.socket, job=job, rank=0, world_size=1, **kw)


def _all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 5, generator=g)
    out = {
        "f64": base.double(), "f32": base, "f16": base.half(), "bf16": base.bfloat16(),
        "c64": torch.complex(base, base.flip(0)), "c128": torch.complex(base, base).to(torch.complex128),
        "i64": (base * 100).long(), "i32": (base * 100).int(), "i16": (base * 100).short(),
        "i8": (base * 10).to(torch.int8), "u8": (base.abs() * 10).to(torch.uint8),
        "bool": base > 0, "scalar": torch.tensor(3.5), "empty": torch.empty(0, 3),
        "fp8": base.to(torch.float8_e4m3fn), "fp8b": base.to(torch.float8_e5m2),
        "u16": (base.abs() * 100).to(torch.uint16), "u32": (base.abs() * 100).to(torch.uint32),
        "noncontig": base.t(), "strided": base[::2, 1::2], "expanded": torch.arange(3.0).expand(4, 3),
        "view_of_f32": base[1],
    }
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise (NaN-safe, -0.0-safe) equality."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))


def test_every_dtype_and_shape_round_trips_bitwise(daemon, job_id):
    orig = _all_dtypes()
    saved = {k: v.clone() for k, v in orig.items()}
    state = {"tensors": dict(orig)}
    with _snap(daemon, job_id) as snap:
        r = snap.snapshot(state, 0).result(timeout=30)
        assert (r.step, r.status, r.level) == (0, "committed", "local")
        for t in orig.values():  # scribble over the user's tensors: the snapshot must not alias them
            if t.numel() and t.is_contiguous():
                _bytes(t).fill_(0x3C)
        assert not _equal(orig["f32"], saved["f32"])
        fresh = {"tensors": {k: torch.zeros_like(v) for k, v in orig.items()}}
        fresh["tensors"]["expanded"] = torch.zeros(3).expand(4, 3)  # cannot be written in place
        fresh["tensors"]["noncontig"] = torch.zeros(5, 6).t()
        assert snap.restore(fresh) == 0
        for k, v in saved.items():
            assert _equal(v, fresh["tensors"][k]), k


def test_leaves_keep_their_types_and_tuples_stay_tuples(daemon, job_id):
    state = {
        "meta": {"epoch": 3, "name": "run", "lr": 0.125, "flags": (True, None, b"\x00\xff"),
                 7: "int key", "big": 1 << 90, "nested": [1, (2, [3, {"x": (4,)}])]},
        "arr": np.arange(12, dtype=np.float32).reshape(3, 4),
        "np_scalar": np.int64(5),
    }
    want = {k: v for k, v in state["meta"].items()}
    with _snap(daemon, job_id) as snap:
        snap.snapshot(state, 1).result(timeout=30)
        state["meta"] = {"epoch": 0}
        state["arr"] = None
        assert snap.restore(state) == 1
    assert state["meta"] == want
    assert isinstance(state["meta"]["flags"], tuple)
    assert isinstance(state["meta"]["nested"][1], tuple)
    assert np.array_equal(state["arr"], np.arange(12, dtype=np.float32).reshape(3, 4))
    assert state["np_scalar"] == 5


def test_unsupported_values_raise_type_error_naming_the_key(daemon, job_id):
    with _snap(daemon, job_id) as snap:
        with pytest.raises(TypeError, match=r"opts\.handle"):
            snap.snapshot({"opts": {"handle": object()}}, 0)
        with pytest.raises(TypeError, match="sparse"):
            snap.snapshot({"s": torch.eye(3).to_sparse()}, 0)


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return m, torch.optim.Adam(m.parameters(), lr=0.01)


def _train_step(m, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 8, generator=g)
    opt.zero_grad()
    m(x).pow(2).mean().backward()
    opt.step()


def test_layout_change_re_registers_and_restores_cold_optimizer(daemon, job_id):
    m, opt = _model()
    state = {"model": m, "optim": opt}
    with _snap(daemon, job_id) as snap:
        snap.snapshot(state, 0).result(timeout=30)  # Adam has no state yet: small layout
        _train_step(m, opt, 1)
        snap.snapshot(state, 1).result(timeout=30)  # exp_avg, exp_avg_sq appear: larger layout
        assert snap.stats.registrations == 2
        want_m = {k: v.clone() for k, v in m.state_dict().items()}
        want_o = opt.state_dict()
    m2, opt2 = _model()  # a fresh process would have no optimizer state at all
    with _snap(daemon, job_id) as snap:
        assert snap.restore({"model": m2, "optim": opt2}) == 1
    for k, v in want_m.items():
        assert torch.equal(v, m2.state_dict()[k]), k
    got_o = opt2.state_dict()
    for i, st in want_o["state"].items():
        for k, v in st.items():
            assert torch.equal(v, got_o["state"][i][k])
    assert got_o["param_groups"][0]["betas"] == want_o["param_groups"][0]["betas"]
    assert isinstance(got_o["param_groups"][0]["betas"], tuple)
    # the restored optimizer state is the user's own memory, not a view of shm
    shm_free = all(v.untyped_storage().nbytes() == v.nbytes for st in opt2.state.values() for v in st.values())
    assert shm_free


def test_rng_is_restored(daemon, job_id):
    with _snap(daemon, job_id) as snap:
        torch.manual_seed(5); random.seed(5); np.random.seed(5)
        snap.snapshot({"x": torch.zeros(1)}, 0).result(timeout=30)
        want = (torch.rand(4), random.random(), np.random.rand())
        torch.manual_seed(99); random.seed(99); np.random.seed(99)
        assert snap.restore({"x": torch.zeros(1)}) == 0
        got = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]


def test_nothing_to_restore_says_so(daemon, job_id):
    with _snap(daemon, job_id) as snap:
        assert snap.restore({"x": torch.zeros(1)}) is None
        assert snap.last_restore.step is None and "nothing" in str(snap.last_restore)


def test_two_jobs_do_not_see_each_other(daemon, job_id):
    a, b = torch.full((4,), 1.0), torch.full((4,), 2.0)
    with _snap(daemon, job_id + "a") as sa, _snap(daemon, job_id + "b") as sb:
        sa.snapshot({"t": a}, 10).result(timeout=30)
        sb.snapshot({"t": b}, 20).result(timeout=30)
        ta, tb = {"t": torch.zeros(4)}, {"t": torch.zeros(4)}
        assert sa.restore(ta) == 10 and sb.restore(tb) == 20
        assert torch.equal(ta["t"], a) and torch.equal(tb["t"], b)
    with _snap(daemon, job_id + "c") as sc:
        assert sc.restore({"t": torch.zeros(4)}) is None


def test_a_lower_step_starts_a_new_history(daemon, job_id):
    t = torch.zeros(3)
    with _snap(daemon, job_id) as snap:
        for step in range(6):
            t.fill_(step)
            snap.snapshot({"t": t}, step).result(timeout=30)
        # the job restarts from scratch under the same id without restoring
        for step in range(3):
            t.fill_(100 + step)
            snap.snapshot({"t": t}, step).result(timeout=30)
        out = {"t": torch.zeros(3)}
        assert snap.restore(out) == 2
        assert torch.equal(out["t"], torch.full((3,), 102.0))
        assert snap.versions()[0] == 2 and 5 not in snap.versions()


def test_restore_drops_newer_versions(daemon, job_id):
    t = torch.zeros(2)
    with _snap(daemon, job_id, slots=3) as snap:
        for step in range(3):
            t.fill_(step)
            snap.snapshot({"t": t}, step).result(timeout=30)
        assert snap.versions() == [2, 1, 0]
        daemon.request("resume", {"job": job_id, "rank": 0, "step": 1})
        assert snap.versions() == [1, 0]
        out = {"t": torch.zeros(2)}
        assert snap.restore(out) == 1 and torch.equal(out["t"], torch.ones(2))


def test_memory_limit_is_a_clear_capacity_error(make_daemon, job_id):
    d = make_daemon(["--memory-limit", "1MB"])
    with _snap(d, job_id) as snap:
        fut = snap.snapshot({"big": torch.zeros(1 << 20)}, 0)  # 4 MiB
        with pytest.raises(CapacityError, match=r"--memory-limit .*leaves") as ei:
            fut.result(timeout=30)
        assert ei.value.details["needed"] > 4 << 20
        # the daemon keeps serving, and a state that fits still works
        assert snap.snapshot({"small": torch.zeros(10)}, 1).result(timeout=30).status == "committed"
    assert d.proc.poll() is None


def test_finish_frees_every_segment(daemon, job_id):
    snap = _snap(daemon, job_id)
    snap.snapshot({"t": torch.ones(1000)}, 0).result(timeout=30)
    assert daemon.segments()
    snap.finish()
    assert [p for p in daemon.segments() if job_id in p.name] == []
    assert daemon.job_status(job_id) is None


def test_no_daemon_is_a_clear_error(tmp_path, job_id):
    with pytest.raises(UnavailableError, match="no shardkeep daemon"):
        Snapshotter(socket=str(tmp_path / "none.sock"), job=job_id).restore({})


def test_job_id_from_environment(monkeypatch, daemon):
    monkeypatch.delenv("SHARDKEEP_JOB", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(ValueError, match="no job id"):
        Snapshotter(socket=daemon.socket)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "elastic-7")
    s = Snapshotter(socket=daemon.socket)
    assert s.job == "elastic-7"
    s.close()
    monkeypatch.setenv("SHARDKEEP_JOB", "explicit")
    s = Snapshotter(socket=daemon.socket)
    assert s.job == "explicit"
    s.close()


def test_skip_when_no_slot_is_free(daemon, job_id):
    t = torch.zeros(4)
    with _snap(daemon, job_id) as snap:
        snap.snapshot({"t": t}, 0).result(timeout=30)
        snap.snapshot({"t": t}, 1).result(timeout=30)
        # a reader pins step 0; step 1 is the newest recorded version: both slots are taken
        daemon.request("open", {"job": job_id, "rank": 0, "step": 0})
        r = snap.snapshot({"t": t}, 2).result(timeout=30)
        assert r.status == "skipped" and r.level is None
        assert snap.stats.skipped == 1
        assert daemon.job_status(job_id)["skips"] == 1
        assert snap.versions()[0] == 1


def test_state_without_tensors(daemon, job_id):
    state = {"epoch": 4, "names": ("a", "b")}
    with _snap(daemon, job_id, rng=False) as snap:
        assert snap.snapshot(state, 0).result(timeout=30).status == "committed"
        out = {"epoch": 0, "names": None}
        assert snap.restore(out) == 0 and out == state


def test_growing_layout_frees_the_old_slots_once_the_new_one_commits(daemon, job_id):
    with _snap(daemon, job_id) as snap:
        snap.snapshot({"t": torch.zeros(1000)}, 0).result(timeout=30)
        snap.snapshot({"t": torch.zeros(1000)}, 1).result(timeout=30)
        small = {p.name for p in daemon.segments()}
        assert len(small) == 2
        snap.snapshot({"t": torch.ones(500_000)}, 2).result(timeout=30)
        now = {p.name for p in daemon.segments()}
        assert len(now) == 2 and not now & small, "old-layout slots must go once the new layout is recorded"
        out = {"t": torch.zeros(500_000)}
        assert snap.restore(out) == 2 and torch.equal(out["t"], torch.ones(500_000))


@pytest.mark.parametrize("hash_threads", [0, 2])
def test_checksums_inline_or_on_threads_verify_the_same(daemon, job_id, hash_threads):
    g = torch.Generator().manual_seed(7)
    state = {"a": torch.randn(3_000_000, generator=g), "b": torch.randn(777, 3, generator=g).t(),
             "c": torch.arange(10**6, dtype=torch.int64)}
    want = {k: v.clone() for k, v in state.items()}
    with _snap(daemon, job_id, hash_threads=hash_threads) as snap:
        snap.snapshot(state, 0).result(timeout=30)
        out = {k: torch.zeros_like(v) for k, v in state.items()}
        assert snap.restore(out) == 0
        assert snap.last_restore.fell_back_from == []
    for k in want:
        assert torch.equal(out[k], want[k]), k


def test_a_loader_generator_and_an_lr_scheduler_resume_exactly(daemon, job_id):
    m, opt = _model()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    gen = torch.Generator().manual_seed(11)
    loader = torch.utils.data.DataLoader(list(range(40)), batch_size=4, shuffle=True, generator=gen)
    state = {"model": m, "optim": opt, "sched": sched, "loader_gen": gen}
    with _snap(daemon, job_id) as snap:
        for step in range(3):
            _train_step(m, opt, step)
            sched.step()
        snap.snapshot(state, 2).result(timeout=30)
        want_order = [b.tolist() for b in loader]          # the next epoch's order
        want_lr = opt.param_groups[0]["lr"]
        gen.manual_seed(999)                                # a restarted process draws differently
        for _ in range(3):
            sched.step()
        assert snap.restore(state) == 2
    assert [b.tolist() for b in loader] == want_order
    assert opt.param_groups[0]["lr"] == want_lr and sched.last_epoch == 3
