"""AsyncPipeline: nothing lost under concurrent load, order kept, errors isolated, bottleneck naming on an
injected clock, back-pressure and clean shutdown. Waits are failure bounds only."""

import concurrent.futures
import functools
import queue
import threading

import pytest
import torch

from torchopt.kernels import preprocess, preprocess_ref
from torchopt.serve import AsyncPipeline, PipelineClosed, PipelineConfig, Stage

WAIT = 10.0  # failure bound only


def _jitter(x):
    """Uneven work per item (so threads finish out of order), with no dependence on time."""
    torch.randn(64 + 97 * (x % 7), 64).sum()
    return x


def test_map_keeps_input_order_across_multithreaded_stages_under_concurrent_submitters():
    stages = [Stage("a", lambda x: x + 1, threads=3), Stage("b", _jitter, threads=4), ("c", lambda x: x * 10)]
    with AsyncPipeline(stages, queue_size=2) as pipe:
        assert list(pipe.map(range(200))) == [(i + 1) * 10 for i in range(200)]

        results = {}

        def client(t):
            futures = [(i, pipe.submit(t * 100 + i)) for i in range(40)]
            for i, f in futures:
                results[t, i] = f.result(timeout=WAIT)

        clients = [threading.Thread(target=client, args=(t,)) for t in range(8)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(WAIT)
        stats = pipe.stats()
    assert results == {(t, i): (t * 100 + i + 1) * 10 for t in range(8) for i in range(40)}
    assert stats.submitted == stats.completed == 520 and stats.failed == 0 and stats.in_flight == 0
    assert [s.items for s in stats.stages.values()] == [520, 520, 520]


def test_ordered_map_waits_for_a_slow_first_item():
    release = threading.Event()

    def stage(x):
        if x == 0:
            assert release.wait(WAIT)
        if x == 5:
            release.set()  # item 0 finishes only after every later item has passed this stage
        return x

    with AsyncPipeline([Stage("s", stage, threads=6)]) as pipe:
        assert list(pipe.map(range(6))) == [0, 1, 2, 3, 4, 5]


def test_unordered_map_yields_results_as_they_complete():
    release = threading.Event()
    stage = functools.partial(lambda release, x: release.wait(WAIT) and x if x == 0 else x, release)
    with AsyncPipeline([Stage("s", stage, threads=2)]) as pipe:
        results = pipe.map([0, 1], ordered=False)
        assert next(results) == 1  # item 0 is still held
        release.set()
        assert next(results) == 0
        assert list(results) == []


def test_a_failing_item_fails_alone_with_its_error_and_the_stage_named():
    def parse(x):
        if x == 3:
            raise ValueError(f"cannot parse item {x}")
        return x

    with AsyncPipeline([("parse", parse, 2), ("double", lambda x: 2 * x)]) as pipe:
        out = list(pipe.map(range(6), return_exceptions=True))
        stats = pipe.stats()
        with pytest.raises(ValueError, match="cannot parse item 3") as info:
            list(pipe.map(range(6)))
    assert out[:3] + out[4:] == [0, 2, 4, 8, 10]
    assert isinstance(out[3], ValueError) and str(out[3]) == "cannot parse item 3"
    assert "in AsyncPipeline stage 'parse'" in info.value.__notes__
    assert stats.failed == 1 and stats.completed == 5
    assert stats.stages["parse"].failures == 1 and stats.stages["double"].items == 5


def test_bottleneck_is_the_stage_with_most_busy_time_per_item_per_thread():
    now = [0.0]

    def work(seconds):
        def fn(x):
            now[0] += seconds  # the injected clock moves only inside the stages
            return x

        return fn

    for infer_threads, expected in ((1, "infer"), (4, "post")):
        stages = [Stage("decode", work(1.0)), Stage("infer", work(5.0), infer_threads), Stage("post", work(2.0))]
        with AsyncPipeline(stages, clock=lambda: now[0]) as pipe:
            for i in range(3):  # one at a time, so each busy interval holds only its own stage's work
                assert pipe.submit(i).result(timeout=WAIT) == i
            stats = pipe.stats()
        assert stats.bottleneck == expected
        assert [s.time_per_item_ms for s in stats.stages.values()] == pytest.approx([1000.0, 5000.0, 2000.0])
        assert stats.stages["infer"].capacity_per_s == pytest.approx(infer_threads / 5.0)
        assert stats.stages["infer"].p50_ms == pytest.approx(5000.0)
        assert stats.p50_ms == pytest.approx(8000.0)


def test_no_bottleneck_before_any_item():
    with AsyncPipeline([Stage("a", lambda x: x)]) as pipe:
        assert pipe.stats().bottleneck is None


def test_preprocess_kernel_as_a_stage_on_cpu(seed):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    options = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "layout": "NCHW"}
    frames = [torch.randint(0, 256, (30 + 3 * i, 41, 3), dtype=torch.uint8) for i in range(6)]
    stages = [
        Stage("decode", lambda frame: frame.contiguous(), threads=2),
        Stage("preprocess", functools.partial(preprocess, size=(16, 16), backend="reference", **options)),
        Stage("infer", lambda x: model(x[None])[0]),
        Stage("postprocess", lambda logits: int(logits.argmax())),
    ]
    with torch.no_grad(), AsyncPipeline(stages) as pipe:
        labels = list(pipe.map(frames))
        expected = [int(model(preprocess_ref(f, (16, 16), **options)[None])[0].argmax()) for f in frames]
    assert labels == expected


def test_a_full_first_queue_makes_submit_raise_queue_full():
    gate, entered = threading.Event(), threading.Event()

    def held(x):
        entered.set()
        assert gate.wait(WAIT)
        return x

    pipe = AsyncPipeline([Stage("held", held, queue_size=1)])
    try:
        first = pipe.submit(0)
        assert entered.wait(WAIT)
        second = pipe.submit(1)
        with pytest.raises(queue.Full, match=r"first stage 'held' queue is full \(1 items\) after waiting 0 s"):
            pipe.submit(2, timeout=0)
        assert pipe.stats().stages["held"].queue_depth == 1
    finally:
        gate.set()
        pipe.close()
    assert (first.result(timeout=0), second.result(timeout=0)) == (0, 1)


def test_a_slow_stage_blocks_the_stage_before_it():
    gate, entered = threading.Event(), threading.Event()

    def slow(x):
        entered.set()
        assert gate.wait(WAIT)
        return x

    pipe = AsyncPipeline([Stage("fast", lambda x: x), Stage("slow", slow)], queue_size=1)
    try:
        futures = [pipe.submit(0)]
        assert entered.wait(WAIT)
        # 1 waits in front of "slow", 2 is held by "fast" (blocked handing it on), 3 waits in front of "fast"
        futures += [pipe.submit(i) for i in (1, 2, 3)]
        with pytest.raises(queue.Full):
            pipe.submit(4, timeout=0.05)
    finally:
        gate.set()
        pipe.close()
    assert [f.result(timeout=0) for f in futures] == [0, 1, 2, 3]
    assert pipe.stats().stages["fast"].blocked_s > 0


@pytest.mark.parametrize("drain", [True, False])
def test_close_drains_or_cancels_and_leaves_no_thread(drain):
    baseline = threading.active_count()
    gate, entered = threading.Event(), threading.Event()

    def held(x):
        entered.set()
        assert gate.wait(WAIT)
        return x

    pipe = AsyncPipeline([Stage("held", held), Stage("after", lambda x: x + 100, threads=2)])
    assert threading.active_count() == baseline + 3
    futures = [pipe.submit(0)]
    assert entered.wait(WAIT)
    futures += [pipe.submit(i) for i in range(1, 5)]
    closer = threading.Thread(target=pipe.close, kwargs={"drain": drain})
    closer.start()
    assert _wait_for(lambda: pipe.closed)
    with pytest.raises(PipelineClosed, match=r"AsyncPipeline is (draining|cancelling) \(close\(\) was called\)"):
        pipe.submit(9)
    gate.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert threading.active_count() == baseline
    if drain:
        assert [f.result(timeout=0) for f in futures] == [100, 101, 102, 103, 104]
    else:
        for f in futures:
            with pytest.raises(concurrent.futures.CancelledError):
                f.result(timeout=0)
        assert pipe.stats().cancelled == 5
    pipe.close()  # again: harmless


def test_leaving_map_early_cancels_the_items_not_started():
    seen = []
    with AsyncPipeline([Stage("s", lambda x: seen.append(x) or x)], queue_size=4) as pipe:
        for x in pipe.map(range(1000)):
            if x == 2:
                break
    assert len(seen) < 1000


@pytest.mark.parametrize(
    ("stages", "options", "error", "message"),
    [
        ([], {}, ValueError, r"stages must name at least one stage, got an empty list"),
        ("abc", {}, TypeError, r"stages must be a list of Stage or \(name, fn\[, threads\]\) tuples, got str"),
        ([("a", abs), ("a", abs)], {}, ValueError, r"stage names must be unique; \['a'\] appear more than once"),
        ([("a",)], {}, TypeError, r"stages\[0\] must be a Stage or a \(name, fn\[, threads\]\) tuple"),
        ([("a", 3)], {}, TypeError, r"Stage 'a' fn must be callable \(item -> item\), got int"),
        ([("a", abs, 0)], {}, ValueError, r"Stage 'a' threads must be > 0, got 0"),
        ([("", abs)], {}, ValueError, r"Stage.name must be a non-empty string"),
        ([("a", abs)], {"queue_size": 0}, ValueError, r"PipelineConfig.queue_size must be > 0, got 0"),
        ([("a", abs)], {"queue_sise": 2}, ValueError, r"unknown key 'queue_sise' in AsyncPipeline options"),
    ],
)
def test_bad_stages_and_options_name_the_argument(stages, options, error, message):
    with pytest.raises(error, match=message):
        AsyncPipeline(stages, **options)


def test_config_round_trips_and_merges_overrides():
    cfg = PipelineConfig(queue_size=3, submit_timeout=1.5)
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg
    with AsyncPipeline([("a", abs)], cfg, cuda_streams=False) as pipe:
        assert pipe.config == PipelineConfig(queue_size=3, submit_timeout=1.5, cuda_streams=False)


@pytest.mark.gpu
def test_cuda_stages_hand_tensors_over_streams_in_order():
    stages = [
        Stage("upload", lambda x: x.to("cuda", non_blocking=True), threads=2),
        Stage("square", lambda x: (x.float() @ x.float().T).sum(), threads=2),
        Stage("download", lambda x: x.cpu()),
    ]
    inputs = [torch.randn(256, 256).pin_memory() for _ in range(64)]
    with AsyncPipeline(stages) as pipe:
        out = list(pipe.map(inputs))
    for x, y in zip(inputs, out, strict=True):
        torch.testing.assert_close(y, (x @ x.T).sum(), rtol=1e-3, atol=1e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_cuda_device_without_cuda_names_the_option():
    with pytest.raises(ValueError, match=r"PipelineConfig.device 'cuda:1' needs CUDA, but CUDA is not available"):
        AsyncPipeline([("a", abs)], device="cuda:1")


def test_a_device_of_the_wrong_type_names_the_option():
    with pytest.raises(TypeError, match=r"PipelineConfig.device .*'cuda:1' or an index.*1.5"):
        AsyncPipeline([("a", abs)], device=1.5)


def test_device_round_trips_through_the_config():
    cfg = PipelineConfig(device="cuda:1")
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.multi_gpu
def test_cuda_stages_on_device_1_run_on_device_1_streams():
    seen = []

    def square(x):
        seen.append((torch.cuda.current_device(), torch.cuda.current_stream().device))
        return (x.float() @ x.float().T).sum()

    stages = [
        Stage("upload", lambda x: x.to("cuda:1", non_blocking=True)),
        Stage("square", square),
        ("down", torch.Tensor.cpu),
    ]
    inputs = [torch.randn(128, 128).pin_memory() for _ in range(16)]
    with AsyncPipeline(stages, device="cuda:1") as pipe:
        assert pipe.device == torch.device("cuda", 1)
        out = list(pipe.map(inputs))
    assert set(seen) == {(1, torch.device("cuda", 1))}
    for x, y in zip(inputs, out, strict=True):
        torch.testing.assert_close(y, (x @ x.T).sum(), rtol=1e-3, atol=1e-2)


def _wait_for(predicate, timeout=WAIT):
    tick = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        tick.wait(0.01)
    return False
