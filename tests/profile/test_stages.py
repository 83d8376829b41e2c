"""torchopt.profile.stage / StageRecorder / stage_modules: nesting, threads, decorator use, cost, errors."""

import threading
import time

import pytest
import torch

import torchopt.profile as tp
from torchopt.profile.stages import StageRecorder, current_stage


def test_nesting_records_paths_and_depths():
    with StageRecorder() as rec:
        with tp.stage("outer"):
            assert current_stage() == "outer"
            with tp.stage("inner"):
                assert current_stage() == "outer/inner"
                time.sleep(0.002)
            with tp.stage("inner"):
                pass
        assert current_stage() is None
    paths = [(e.path, e.depth) for e in sorted(rec.events, key=lambda e: e.start_ms)]
    assert paths == [("outer", 0), ("outer/inner", 1), ("outer/inner", 1)]
    outer = next(e for e in rec.events if e.path == "outer")
    inners = [e for e in rec.events if e.path == "outer/inner"]
    for e in inners:  # children lie inside their parent
        assert outer.start_ms <= e.start_ms
        assert e.start_ms + e.duration_ms <= outer.start_ms + outer.duration_ms
    stats = {s.path: s for s in rec.stats()}
    assert stats["outer/inner"].count == 2
    assert stats["outer/inner"].total_ms >= 2.0
    assert stats["outer"].total_ms >= stats["outer/inner"].total_ms
    assert 0 < stats["outer"].share <= 1.0
    assert inners[0].name == "inner"


def test_known_sleep_shows_in_the_right_stage():
    with StageRecorder() as rec:
        for _ in range(3):
            with tp.stage("fast"):
                pass
            with tp.stage("slow"):
                time.sleep(0.01)
    stats = {s.path: s for s in rec.stats()}
    assert stats["slow"].count == stats["fast"].count == 3
    assert stats["slow"].mean_ms >= 10.0  # a sleep never returns early, however loaded the machine


def test_decorator_gets_a_fresh_instance_per_call():
    @tp.stage("rec")
    def recurse(n):
        return 0 if n == 0 else 1 + recurse(n - 1)

    with StageRecorder() as rec:
        assert recurse(2) == 2
    assert sorted(e.path for e in rec.events) == ["rec", "rec/rec", "rec/rec/rec"]


def test_stage_exits_on_exception():
    with StageRecorder() as rec, pytest.raises(RuntimeError), tp.stage("boom"):
        raise RuntimeError("x")
    assert current_stage() is None
    assert [e.path for e in rec.events] == ["boom"]


def test_threads_have_their_own_stacks():
    def work():
        with tp.stage("worker"):
            time.sleep(0.001)

    with StageRecorder() as rec, tp.stage("main"):
        t = threading.Thread(target=work)
        t.start()
        t.join()
    paths = {e.path: e.thread for e in rec.events}
    assert set(paths) == {"main", "worker"}  # not "main/worker": the thread has its own stack
    assert paths["main"] != paths["worker"]


def test_stage_enters_record_function_under_the_profiler():
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, tp.stage("outer"), tp.stage("inner"):
        torch.randn(8).sum()
    names = {e.name for e in prof.events()}
    assert {"outer", "outer/inner"} <= names


def test_cheap_without_profiler(monkeypatch):
    # Cheap means: outside a profiler session a stage starts no record_function (a profiler range per call is
    # what made it slow). Checked by what it calls, not by timing it: timings depend on the machine's load.
    started = []
    monkeypatch.setattr(torch.autograd.profiler, "record_function", lambda *a, **k: started.append(a))
    for _ in range(1000):
        with tp.stage("x"):
            pass
    assert started == []


def test_stage_modules_marks_children_and_removes_hooks():
    inner = torch.nn.Sequential(torch.nn.Linear(8, 2))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), inner)
    x = torch.randn(3, 8)
    with tp.stage_modules(model) as names, StageRecorder() as rec:
        model(x)
    assert names == ["0", "1", "2"]
    assert [e.path for e in sorted(rec.events, key=lambda e: e.start_ms)] == ["0", "1", "2"]
    with StageRecorder() as rec2:
        model(x)
    assert rec2.events == []  # hooks removed


def test_stage_modules_named_nested():
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()))
    with tp.stage_modules(model, ["0", "0.1"]), StageRecorder() as rec:
        model(torch.randn(2, 8))
    assert sorted(e.path for e in rec.events) == ["0", "0/0.1"]


@pytest.mark.parametrize(
    ("name", "error"),
    [(3, TypeError), (None, TypeError), (b"x", TypeError), ("", ValueError), ("a/b", ValueError)],
)
def test_bad_stage_names(name, error):
    with pytest.raises(error, match="stage name must be"):
        tp.stage(name)


def test_stage_modules_bad_input():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"), tp.stage_modules(lambda x: x):
        pass
    with pytest.raises(ValueError, match="has no submodule 'fc'"), tp.stage_modules(model, ["fc"]):
        pass
    with pytest.raises(TypeError, match="names must be a list"), tp.stage_modules(model, "0"):
        pass
    with pytest.raises(TypeError, match="sync must be a bool"):
        StageRecorder(sync=1)
