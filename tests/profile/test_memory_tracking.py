"""torchopt.profile memory: RSS, per-stage peaks, snapshots, the watcher; CUDA allocator tests on GPU."""

import json
import pickle
import threading
import time

import pytest
import torch

import torchopt.profile as tp
from torchopt.profile.memory_tracking import fragmentation, record_history, rss_bytes

MiB = 2**20
# Touched (not just reserved) CPU memory shows in RSS; 64 MiB stands well above allocator and page noise.
BLOCK = 64 * MiB


def _touched_block(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(BLOCK // 4, generator=g)  # writes every page


def test_rss_sees_a_known_allocation():
    before = rss_bytes()
    block = _touched_block()
    after = rss_bytes()
    assert after - before >= 0.9 * BLOCK, (before, after)
    del block


def test_snapshots_and_compare_on_cpu():
    a = tp.snapshot("before")
    block = _touched_block()
    b = tp.snapshot("after")
    diff = tp.compare_snapshots(a, b)
    assert a.device == "cpu" and a.allocated_bytes == a.rss_bytes
    assert diff.delta["rss_bytes"] >= 0.9 * BLOCK
    assert diff.before == "before" and diff.after == "after" and diff.seconds >= 0
    assert "rss_bytes" in str(diff) and "MiB" in str(diff)
    assert json.loads(json.dumps(diff.to_dict()))["delta"]["rss_bytes"] == diff.delta["rss_bytes"]
    del block


def test_per_stage_peaks_on_cpu():
    keep = []

    def fn():
        with tp.stage("small"):
            torch.ones(16)
        with tp.stage("big"), tp.stage("alloc"):
            keep.append(_touched_block())  # still alive at the stage's exit: seen at the boundary

    rep = tp.memory(fn, sample_interval_ms=2)
    stages = {s.path: s for s in rep.stages}
    assert set(stages) == {"small", "big", "big/alloc"}
    assert stages["big/alloc"].peak_increase_bytes >= 0.9 * BLOCK
    assert stages["big"].peak_increase_bytes >= 0.9 * BLOCK  # nested peaks fold into the parent
    assert stages["big/alloc"].retained_bytes >= 0.9 * BLOCK
    assert stages["small"].peak_increase_bytes < BLOCK / 4
    assert rep.peak_allocated_bytes >= rep.start.rss_bytes + 0.9 * BLOCK
    assert rep.fragmentation is None and rep.device == "cpu"
    assert rep.timeline and [m[2] for m in rep.stage_marks].count("enter") == 3
    assert [t.t_s for t in rep.timeline] == sorted(t.t_s for t in rep.timeline)
    assert "big/alloc" in str(rep)
    json.dumps(rep.to_dict())
    keep.clear()


def test_block_mode_and_iters():
    calls = {"n": 0}

    def fn(x):
        calls["n"] += 1
        with tp.stage("s"):
            return x * 2

    rep = tp.memory(fn, torch.randn(8), iters=3, sample_interval_ms=0)
    assert calls["n"] == 3 and rep.stages[0].count == 3 and rep.timeline  # boundary readings only
    with tp.memory(sample_interval_ms=0) as mem, tp.stage("blk"):
        pass
    assert [s.path for s in mem.result.stages] == ["blk"]


def test_rss_watcher_fires_once_per_crossing():
    hits = []
    base = rss_bytes()
    with tp.VRAMMonitor(base + BLOCK // 2, hits.append, interval_s=0.005, metric="rss") as mon:
        time.sleep(0.03)
        assert not hits
        block = _touched_block()
        deadline = time.time() + 5.0
        while not hits and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(0.03)  # more samples above the threshold: no second call
    assert len(hits) == 1 and mon.crossings == 1
    assert hits[0].value_bytes >= base + BLOCK // 2
    assert mon.peak_bytes >= hits[0].value_bytes
    assert len(mon.samples) >= 3
    del block


def test_watcher_surfaces_callback_errors():
    def boom(sample):
        raise KeyError("callback failed")

    mon = tp.VRAMMonitor(1, boom, interval_s=0.001, metric="rss").start()
    deadline = time.time() + 5.0
    while mon._error is None and time.time() < deadline:
        time.sleep(0.002)
    with pytest.raises(RuntimeError, match="callback failed"):
        mon.stop()
    assert not any(t.name == "torchopt-vram-monitor" for t in threading.enumerate())


def test_watcher_fraction_threshold():
    mon = tp.VRAMMonitor(0.5, metric="rss")
    assert 0 < mon.threshold_bytes < mon.total_bytes
    mon.sample()
    assert mon.samples[-1].value_bytes > 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"threshold": 1.5, "metric": "rss"}, ValueError, r"fraction must be in \(0, 1\]"),
        ({"threshold": -5, "metric": "rss"}, ValueError, "threshold must be > 0, got -5"),
        ({"threshold": "1GB", "metric": "rss"}, TypeError, "threshold must be bytes"),
        ({"metric": "vram"}, ValueError, "metric must be one of"),
        ({"interval_s": 0, "metric": "rss"}, ValueError, "interval_s must be > 0"),
        ({"callback": 3, "metric": "rss"}, TypeError, "callback must be callable"),
    ],
)
def test_watcher_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        tp.VRAMMonitor(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
def test_cuda_only_features_say_so_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="no CUDA device"):
        tp.VRAMMonitor(metric="reserved")
    with pytest.raises(ValueError, match="not CUDA"):
        fragmentation("cpu")
    with pytest.raises(ValueError, match="not CUDA"), record_history(tmp_path / "h.pickle", device="cpu"):
        pass
    with pytest.raises(ValueError, match="record_history=True records the CUDA caching allocator"):
        tp.memory(torch.relu, torch.randn(2), record_history=True, history_path=str(tmp_path / "h.pickle"))
    with pytest.raises(ValueError, match="needs CUDA"):
        tp.snapshot(device="cuda")


def test_memory_bad_input(tmp_path):
    with pytest.raises(TypeError, match="fn must be callable"):
        tp.memory("model")
    with pytest.raises(ValueError, match="needs history_path"):
        tp.memory(torch.relu, torch.randn(2), record_history=True)
    with pytest.raises(ValueError, match="iters must be > 0"):
        tp.memory(torch.relu, torch.randn(2), iters=0)
    with pytest.raises(ValueError, match="device 'tpu:0:1' is not a valid device string"):
        tp.memory(torch.relu, torch.randn(2), device="tpu:0:1")
    with pytest.raises(ValueError, match=r"device type must be one of \['cpu', 'cuda'\], got 'meta'"):
        tp.snapshot(device="meta")
    with pytest.raises(TypeError, match="before must be MemorySnapshot"):
        tp.compare_snapshots({}, tp.snapshot())


def test_config_round_trip():
    cfg = tp.MemoryConfig(device="cpu", iters=2, sample_interval_ms=1.5)
    assert tp.MemoryConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_snapshot_sees_a_known_allocation():
    torch.cuda.synchronize()
    a = tp.snapshot("a", "cuda")
    x = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
    b = tp.snapshot("b", "cuda")
    diff = tp.compare_snapshots(a, b)
    assert diff.delta["allocated_bytes"] == 256 * MiB
    assert diff.delta["reserved_bytes"] >= 0 and b.reserved_bytes >= b.allocated_bytes
    del x


@pytest.mark.gpu
def test_cuda_per_stage_peaks_are_exact_and_nested():
    def fn():
        with tp.stage("outer"):
            with tp.stage("temp"):
                t = torch.empty(128 * MiB, dtype=torch.uint8, device="cuda")  # freed inside the stage
                del t
            with tp.stage("keep"):
                return torch.empty(32 * MiB, dtype=torch.uint8, device="cuda")

    rep = tp.memory(fn, device="cuda")
    s = {st.path: st for st in rep.stages}
    assert s["outer/temp"].peak_increase_bytes == 128 * MiB
    assert s["outer/temp"].retained_bytes == 0
    assert s["outer/keep"].peak_increase_bytes == 32 * MiB
    assert s["outer"].peak_increase_bytes == 128 * MiB  # the child's peak folds into the parent
    assert rep.fragmentation is not None and rep.fragmentation.reserved_bytes >= rep.fragmentation.allocated_bytes


@pytest.mark.gpu
def test_cuda_allocation_history_pickle(tmp_path):
    path = tmp_path / "alloc.pickle"
    rep = tp.memory(
        lambda: torch.empty(8 * MiB, dtype=torch.uint8, device="cuda"),
        device="cuda",
        record_history=True,
        history_path=str(path),
    )
    assert rep.history_path == str(path)
    snap = pickle.loads(path.read_bytes())
    assert "segments" in snap and snap["device_traces"]


@pytest.mark.gpu
def test_vram_watcher_threshold_on_cuda():
    hits = []
    base = torch.cuda.memory_allocated()
    with tp.VRAMMonitor(base + 64 * MiB, hits.append, interval_s=0.002, metric="allocated") as mon:
        x = torch.empty(128 * MiB, dtype=torch.uint8, device="cuda")
        deadline = time.time() + 5.0
        while not hits and time.time() < deadline:
            time.sleep(0.002)
    assert len(hits) == 1 and mon.crossings == 1
    del x
