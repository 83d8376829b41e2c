"""DynamicBatcher: correctness under concurrent load, batching rules, isolation, back-pressure and shutdown.

No test depends on wall-clock speed: batches form behind a model held on an Event (`gated`), the delay runs on
an injected clock (`clock`), and timeouts are only failure bounds.
"""

import collections
import concurrent.futures
import queue
import threading
import types

import pytest
import torch

from torchopt.inputs import InputSpec
from torchopt.serve import BatcherClosed, BatcherConfig, BatcherFull, DynamicBatcher

WAIT = 10.0  # failure bound only


class ProfiledModel:
    """A callable with `.profiles` like a torchopt.OptimizedModule."""

    def __init__(self, *profiles):
        self.profiles = [list(p) for p in profiles]
        self.batches = []

    def __call__(self, x):
        self.batches.append(x.clone())
        return x * 2


def _items(n, shape=(3,), start=0):
    return [torch.full(shape, float(start + i)) for i in range(n)]


def _results(futures):
    return [f.result(timeout=WAIT) for f in futures]


# ---------------------------------------------------------------------------------------------- load


def test_concurrent_load_every_result_is_the_model_on_that_item_alone(seed):
    linear = torch.nn.Linear(8, 4).eval()

    def model(x):
        return linear(x), x[:, 0]  # the tag row identifies which item a result belongs to

    threads, per_thread = 32, 30
    inputs = {(t, i): torch.randn(8) for t in range(threads) for i in range(per_thread)}
    for (t, i), x in inputs.items():
        x[0] = t * 1000 + i
    results = {}
    with DynamicBatcher(model, max_batch=16, max_delay_ms=1) as batcher:
        barrier = threading.Barrier(threads)

        def client(t):
            barrier.wait()
            futures = [(i, batcher.submit(inputs[t, i])) for i in range(per_thread)]
            for i, f in futures:
                results[t, i] = f.result(timeout=WAIT)

        workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(WAIT)
        stats = batcher.stats()

    assert len(results) == threads * per_thread
    with torch.no_grad():
        for key, (y, tag) in results.items():
            x = inputs[key]
            assert tag.item() == x[0].item(), f"request {key} got the result of another item"
            torch.testing.assert_close(y, linear(x[None])[0], atol=1e-5, rtol=1e-5, msg=f"request {key}")
    assert stats.requests == stats.completed == threads * per_thread
    assert stats.failed == stats.cancelled == 0
    assert sum(n * c for n, c in stats.batch_sizes.items()) == threads * per_thread, "items lost or run twice"
    assert max(stats.batch_sizes) <= 16


def test_requests_queued_behind_a_running_batch_form_batches_up_to_max_batch(gated):
    with DynamicBatcher(gated, max_batch=4, max_delay_ms=0) as batcher:
        first = batcher.submit(torch.tensor([0.0]))
        gated.wait_entered()
        rest = [batcher.submit(x) for x in _items(10, (1,), start=1)]
        gated.release()
        out = _results([first, *rest])
        stats = batcher.stats()
    assert gated.sizes == [1, 4, 4, 2]
    assert [o.item() for o in out] == [2 * i + 1 for i in range(11)]
    assert stats.batch_sizes == {1: 1, 2: 1, 4: 2}
    assert stats.batches == 4 and stats.mean_batch == pytest.approx(11 / 4)


class ThreadRecorder:
    """``x * 2`` per row, recording the thread of each call and the most calls ever running at once."""

    def __init__(self, gate=None):
        self.threads, self.running, self.most_at_once = [], 0, 0
        self.gate, self.entered = gate, threading.Event()
        self._lock = threading.Lock()

    def __call__(self, x):
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.threads.append(threading.current_thread().name)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT), "test never released the model"
        with self._lock:
            self.running -= 1
        return x * 2


def test_a_blocking_call_on_an_idle_batcher_runs_in_the_callers_thread():
    model = ThreadRecorder()
    with DynamicBatcher(model, max_batch=8, max_delay_ms=50) as batcher:
        out = batcher(torch.tensor([1.0, 2.0]))
        stats = batcher.stats()
    assert torch.equal(out, torch.tensor([2.0, 4.0]))
    assert model.threads == [threading.current_thread().name]  # no hand-off, no 50 ms batching wait
    assert (stats.caller_runs, stats.requests, stats.completed, stats.batches) == (1, 1, 1, 1)


class OnDevice(ThreadRecorder):
    """A model that declares a device, as `torchopt.OptimizedModule` does (its ``runtime.device``)."""

    def __init__(self, device):
        super().__init__()
        self.runtime = types.SimpleNamespace(device=torch.device(device))


def test_a_model_on_a_gpu_runs_only_in_the_worker_thread():
    # torch.compile's CUDA graphs are recorded per thread: caller threads would each record their own.
    model = OnDevice("cuda")
    with DynamicBatcher(model, max_batch=8, max_delay_ms=0) as batcher:
        out = batcher(torch.tensor([1.0]))
        stats = batcher.stats()
    assert out.item() == 2.0 and model.threads == ["torchopt-batcher"] and stats.caller_runs == 0


@pytest.mark.parametrize(("device", "caller_runs", "runs_in"), [("cpu", False, "worker"), ("cuda", True, "caller")])
def test_caller_runs_overrides_the_device_rule(device, caller_runs, runs_in):
    model = OnDevice(device)
    with DynamicBatcher(model, max_batch=8, max_delay_ms=0, caller_runs=caller_runs) as batcher:
        batcher(torch.tensor([1.0]))
        stats = batcher.stats()
    expected = "torchopt-batcher" if runs_in == "worker" else threading.current_thread().name
    assert model.threads == [expected] and stats.caller_runs == (runs_in == "caller")


def test_caller_runs_must_be_a_bool():
    with pytest.raises(TypeError, match="BatcherConfig.caller_runs"):
        DynamicBatcher(ThreadRecorder(), caller_runs="yes")


def test_a_blocking_call_joins_the_queue_while_the_worker_runs_a_batch():
    model = ThreadRecorder(gate=threading.Event())
    with DynamicBatcher(model, max_batch=8, max_delay_ms=0) as batcher:
        first = batcher.submit(torch.tensor([0.0]))
        assert model.entered.wait(WAIT)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(batcher, torch.tensor([float(i)])) for i in (1, 2)]
            assert _wait_for(lambda: batcher.stats().queue_depth == 2)
            model.gate.set()
            outs = [c.result(WAIT) for c in calls]
        assert first.result(WAIT).item() == 0.0
        stats = batcher.stats()
    assert [o.item() for o in outs] == [2.0, 4.0]
    assert model.threads == ["torchopt-batcher"] * 2 and stats.caller_runs == 0  # batched together by the worker
    assert stats.batch_sizes == {1: 1, 2: 1}


def test_the_worker_never_runs_the_model_while_a_caller_does():
    model = ThreadRecorder(gate=threading.Event())
    with (
        DynamicBatcher(model, max_batch=8, max_delay_ms=0) as batcher,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        own = pool.submit(batcher, torch.tensor([1.0]))
        assert model.entered.wait(WAIT)
        queued = batcher.submit(torch.tensor([2.0]))
        assert not _wait_for(lambda: model.running > 1, timeout=0.2)
        model.gate.set()
        assert own.result(WAIT).item() == 2.0 and queued.result(WAIT).item() == 4.0
    assert model.most_at_once == 1 and model.threads[1] == "torchopt-batcher"


def test_a_blocking_call_raises_the_models_error_and_the_batcher_goes_on():
    def model(x):
        if (x < 0).any():
            raise ValueError("negative input")
        return x + 1

    with DynamicBatcher(model, max_batch=4) as batcher:
        with pytest.raises(ValueError, match="negative input"):
            batcher(torch.tensor([-1.0]))
        assert batcher(torch.tensor([1.0])).item() == 2.0
        assert batcher.stats().failed == 1
    with pytest.raises(BatcherClosed):
        batcher(torch.tensor([1.0]))


def test_each_kind_keeps_its_order_and_different_shapes_are_never_stacked(gated):
    with DynamicBatcher(gated, max_batch=8, max_delay_ms=0) as batcher:
        first = batcher.submit(torch.zeros(2))
        gated.wait_entered()
        mixed = [batcher.submit(torch.full((2,) if i % 2 else (5,), float(i))) for i in range(1, 9)]
        gated.release()
        out = _results([first, *mixed])
    assert [b.shape for b in gated.batches] == [(1, 2), (4, 2), (4, 5)]
    assert gated.batches[1][:, 0].tolist() == [1.0, 3.0, 5.0, 7.0]  # submission order within a kind
    assert gated.batches[2][:, 0].tolist() == [2.0, 4.0, 6.0, 8.0]
    for i, o in enumerate(out):
        assert o.shape == ((5,) if i and i % 2 == 0 else (2,))
        assert torch.all(o == 2 * i + 1)


# ---------------------------------------------------------------------------------------------- delay


def test_the_delay_runs_on_the_injected_clock(clock):
    calls = []

    def model(x):
        calls.append(x.shape[0])
        return x

    with DynamicBatcher(model, max_batch=8, max_delay_ms=10, clock=clock) as batcher:
        futures = [batcher.submit(x) for x in _items(2)]
        clock.wait_reads(3)  # the worker looked at the clock and saw no time pass
        assert calls == [] and not any(f.done() for f in futures)
        clock.advance(0.009)
        clock.wait_reads(3)
        assert calls == [], "flushed before the delay was over"
        clock.advance(0.002)
        _results(futures)
        stats = batcher.stats()
    assert calls == [2]
    assert stats.p50_ms == pytest.approx(11.0) and stats.p99_ms == pytest.approx(11.0)


def test_a_full_batch_runs_without_waiting_for_the_delay(clock):
    calls = []

    def model(x):
        calls.append(x.shape[0])
        return x

    with DynamicBatcher(model, max_batch=3, max_delay_ms=60_000, clock=clock) as batcher:
        _results([batcher.submit(x) for x in _items(3)])
    assert calls == [3]
    assert clock.now == 0.0


# ---------------------------------------------------------------------------------------------- isolation


def test_a_failing_request_fails_alone_with_its_own_error(clock):
    calls = []

    def model(x):
        calls.append(x.shape[0])
        if (x[:, 0] < 0).any():
            raise ValueError(f"negative marker in a batch of {x.shape[0]}")
        return x + 1

    with DynamicBatcher(model, max_batch=5, max_delay_ms=60_000, clock=clock) as batcher:
        items = _items(5)
        items[2] = torch.full((3,), -1.0)
        futures = [batcher.submit(x) for x in items]
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=WAIT)[0].item())
            except ValueError as exc:
                outcomes.append(str(exc))
        late = batcher.submit(torch.ones(3))
        clock.advance(60)
        after = late.result(timeout=WAIT)  # the worker survived
        stats = batcher.stats()
    assert outcomes == [1.0, 2.0, "negative marker in a batch of 1", 4.0, 5.0]
    assert calls[:6] == [5, 1, 1, 1, 1, 1]
    assert torch.equal(after, torch.full((3,), 2.0))
    assert stats.isolated_batches == 1 and stats.failed == 1 and stats.completed == 5


def test_an_output_without_a_batch_dim_fails_every_request_of_the_batch_clearly(clock):
    with DynamicBatcher(lambda x: x.sum(), max_batch=2, max_delay_ms=60_000, clock=clock) as batcher:
        futures = [batcher.submit(x) for x in _items(2)]
        for f in futures:
            with pytest.raises(ValueError, match=r"has shape \(\); the batcher needs dim 0 to be the batch \(2 rows\)"):
                f.result(timeout=WAIT)


def test_output_pytrees_are_split_per_item(clock):
    pair = collections.namedtuple("pair", "double tag")

    def model(x, y):
        return {"p": pair(x * 2, y), "list": [x.sum(-1), None]}

    with DynamicBatcher(model, max_batch=3, max_delay_ms=60_000, clock=clock) as batcher:
        futures = [batcher.submit(torch.full((2,), float(i)), torch.tensor(i)) for i in range(3)]
        out = _results(futures)
    for i, o in enumerate(out):
        assert type(o["p"]) is pair
        assert torch.equal(o["p"].double, torch.full((2,), 2.0 * i))
        assert o["p"].tag.item() == i
        assert o["list"][0].item() == 2.0 * i and o["list"][1] is None


@pytest.mark.parametrize("copy_outputs", [False, True])
def test_copy_outputs_gives_each_request_its_own_storage(clock, copy_outputs):
    with DynamicBatcher(
        lambda x: x * 1, max_batch=2, max_delay_ms=60_000, clock=clock, copy_outputs=copy_outputs
    ) as batcher:
        a, b = _results([batcher.submit(x) for x in _items(2)])
    shared = a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert shared != copy_outputs


# ---------------------------------------------------------------------------------------------- buckets, profiles


@pytest.mark.parametrize("pad", ["repeat", "zeros"])
def test_buckets_pad_the_batch_and_drop_the_padding_rows(gated, pad):
    with DynamicBatcher(gated, max_delay_ms=0, buckets=[1, 2, 4, 8], pad=pad) as batcher:
        first = batcher.submit(torch.tensor([5.0]))
        gated.wait_entered()
        rest = [batcher.submit(x) for x in _items(3, (1,), start=1)]
        gated.release()
        out = _results([first, *rest])
        stats = batcher.stats()
    assert batcher.max_batch == 8  # the largest bucket
    assert gated.sizes == [1, 4]
    filler = 3.0 if pad == "repeat" else 0.0
    assert gated.batches[1][:, 0].tolist() == [1.0, 2.0, 3.0, filler]
    assert [o.item() for o in out] == [11.0, 3.0, 5.0, 7.0]
    assert stats.batch_sizes == {1: 1, 3: 1} and stats.run_sizes == {1: 1, 4: 1} and stats.padded_rows == 1


def test_profile_sets_max_batch_and_profile_buckets():
    model = ProfiledModel([InputSpec("x", min=(1, 3), opt=(8, 3), max=(24, 3))])
    with DynamicBatcher(model) as batcher:
        assert batcher.max_batch == 24
    with DynamicBatcher(model, buckets="profile") as batcher:
        assert batcher.buckets == [1, 2, 4, 8, 16, 24]


def test_a_profile_whose_batch_starts_above_one_gets_padded_batches(clock):
    model = ProfiledModel([InputSpec("x", min=(4, 2), max=(8, 2))])
    with DynamicBatcher(model, max_delay_ms=0, clock=clock) as batcher:
        out = batcher.submit(torch.tensor([1.0, 2.0])).result(timeout=WAIT)
    assert [b.shape[0] for b in model.batches] == [4]
    assert torch.equal(out, torch.tensor([2.0, 4.0]))


def test_items_pick_the_profile_their_shape_fits(clock):
    short = [InputSpec("x", min=(1, 1), max=(16, 64))]
    long = [InputSpec("x", min=(1, 65), max=(4, 512))]
    model = ProfiledModel(short, long)
    with DynamicBatcher(model, max_delay_ms=60_000, clock=clock) as batcher:
        assert batcher.max_batch == 16
        long_items = [batcher.submit(torch.ones(100)) for _ in range(4)]  # their profile caps batches at 4
        _results(long_items)
    assert [tuple(b.shape) for b in model.batches] == [(4, 100)]


def test_max_batch_above_the_profile_is_refused():
    model = ProfiledModel([InputSpec("x", min=(1, 3), max=(8, 3))])
    with pytest.raises(ValueError, match=r"max_batch 16 exceeds the batch max 8 of fast's input profiles"):
        DynamicBatcher(model, max_batch=16)
    with pytest.raises(ValueError, match=r"buckets \[4, 16\] go up to 16, above the batch max 8"):
        DynamicBatcher(model, buckets=[4, 16])


@pytest.mark.parametrize(
    ("item", "error", "message"),
    [
        (torch.ones(5), ValueError, r"input 'x' item dim 0 \(model dim 1\) is 5, outside the profile range \[3, 3\]"),
        (torch.ones(1, 3), ValueError, r"input 'x' item has shape \(1, 3\) \(rank 2\); submit takes one item without"),
        (torch.ones(3, dtype=torch.int64), TypeError, r"item has dtype torch.int64, the profile expects float"),
        ((torch.ones(3), torch.ones(3)), TypeError, r"submit got 2 tensors; the model takes 1 inputs \['x'\]"),
        ([1.0, 2.0, 3.0], TypeError, r"submit argument 0 must be a torch.Tensor \(one item, no batch dim\), got list"),
    ],
)
def test_an_item_the_profile_cannot_take_is_refused_at_submit(item, error, message):
    model = ProfiledModel([InputSpec("x", min=(1, 3), max=(8, 3))])
    with DynamicBatcher(model) as batcher:
        with pytest.raises(error, match=message):
            batcher.submit(*(item if isinstance(item, tuple) else (item,)))
        assert batcher.stats().requests == 0
    assert model.batches == []


def test_submit_without_tensors_is_refused():
    with DynamicBatcher(lambda x: x) as batcher, pytest.raises(TypeError, match="submit needs at least one tensor"):
        batcher.submit()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"max_batch": 0}, ValueError, r"BatcherConfig.max_batch must be > 0, got 0"),
        ({"max_delay_ms": -1}, ValueError, r"BatcherConfig.max_delay_ms must be in \[0, inf\], got -1"),
        ({"max_queue": 1.5}, TypeError, r"BatcherConfig.max_queue must be int, got float 1.5"),
        ({"buckets": []}, ValueError, r"BatcherConfig.buckets must name at least one batch size"),
        ({"buckets": [4, 0]}, ValueError, r"BatcherConfig.buckets\[1\] must be > 0, got 0"),
        ({"buckets": "profiles"}, TypeError, r"BatcherConfig.buckets must be a list of batch sizes, \"profile\""),
        ({"buckets": [1, 2], "max_batch": 4}, ValueError, r"max_batch 4 exceeds the largest bucket 2"),
        ({"pad": "zero"}, ValueError, r"BatcherConfig.pad must be one of \['repeat', 'zeros'\], got 'zero'"),
        ({"submit_timeout": -1}, ValueError, r"BatcherConfig.submit_timeout must be in \[0, inf\]"),
        ({"max_dalay_ms": 1}, ValueError, r"unknown key 'max_dalay_ms' in DynamicBatcher options \(did you mean"),
    ],
)
def test_bad_options_name_the_option(options, error, message):
    with pytest.raises(error, match=message):
        DynamicBatcher(lambda x: x, **options)


def test_config_round_trips_and_merges_overrides():
    cfg = BatcherConfig(max_batch=8, buckets=(8, 2, 4, 2), pad="zeros")
    assert cfg.buckets == [2, 4, 8]
    assert BatcherConfig.from_dict(cfg.to_dict()) == cfg
    with DynamicBatcher(lambda x: x, cfg, max_delay_ms=7) as batcher:
        assert batcher.config == BatcherConfig(max_batch=8, buckets=[2, 4, 8], pad="zeros", max_delay_ms=7)


def test_profile_buckets_need_a_profile_and_fast_must_be_callable():
    with pytest.raises(ValueError, match=r'buckets="profile" needs a model with input profiles'):
        DynamicBatcher(lambda x: x, buckets="profile")
    with pytest.raises(TypeError, match=r"fast must be callable .* got int"):
        DynamicBatcher(3)


# ---------------------------------------------------------------------------------------------- back-pressure


def test_a_full_queue_blocks_submit_then_raises_batcher_full(gated):
    with DynamicBatcher(gated, max_batch=1, max_delay_ms=0, max_queue=2) as batcher:
        running = batcher.submit(torch.zeros(1))
        gated.wait_entered()
        queued = [batcher.submit(x) for x in _items(2, (1,), start=1)]
        with pytest.raises(BatcherFull, match=r"queue is full: 2 requests waiting \(BatcherConfig.max_queue=2\)"):
            batcher.submit(torch.zeros(1), timeout=0)
        with pytest.raises(queue.Full):  # BatcherFull is a queue.Full; a short wait ends the same way
            batcher.submit(torch.zeros(1), timeout=0.05)
        assert batcher.stats().queue_depth == 2

        blocked = []
        t = threading.Thread(target=lambda: blocked.append(batcher.submit(torch.full((1,), 9.0))))
        t.start()
        gated.release()  # the queue drains, so the blocked submit gets in
        t.join(WAIT)
        out = _results([running, *queued, *blocked])
    assert [o.item() for o in out] == [1.0, 3.0, 5.0, 19.0]


# ---------------------------------------------------------------------------------------------- shutdown


def test_close_drains_every_queued_request_and_then_refuses_submits(gated):
    batcher = DynamicBatcher(gated, max_batch=2, max_delay_ms=0)
    futures = [batcher.submit(torch.zeros(1))]
    gated.wait_entered()
    futures += [batcher.submit(x) for x in _items(5, (1,), start=1)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    assert _wait_for(lambda: batcher.closed)
    with pytest.raises(BatcherClosed, match=r"DynamicBatcher is draining \(close\(\) was called\)"):
        batcher.submit(torch.zeros(1))
    gated.release()
    closer.join(WAIT)
    assert [f.result(timeout=0).item() for f in futures] == [1.0, 3.0, 5.0, 7.0, 9.0, 11.0]
    with pytest.raises(BatcherClosed, match=r"DynamicBatcher is closed"):
        batcher.submit(torch.zeros(1))


def test_close_without_drain_cancels_queued_requests_and_finishes_the_running_batch(gated):
    batcher = DynamicBatcher(gated, max_batch=2, max_delay_ms=0)
    running = batcher.submit(torch.zeros(1))
    gated.wait_entered()
    queued = [batcher.submit(x) for x in _items(5, (1,), start=1)]
    closer = threading.Thread(target=batcher.close, kwargs={"drain": False})
    closer.start()
    concurrent.futures.wait(queued, timeout=WAIT)
    assert all(f.cancelled() for f in queued)
    gated.release()
    closer.join(WAIT)
    assert running.result(timeout=0).item() == 1.0
    with pytest.raises(concurrent.futures.CancelledError):
        queued[0].result(timeout=0)
    assert gated.sizes == [1]
    assert batcher.stats().cancelled == 5


def test_a_future_cancelled_by_its_caller_is_not_run(gated):
    with DynamicBatcher(gated, max_batch=4, max_delay_ms=0) as batcher:
        running = batcher.submit(torch.zeros(1))
        gated.wait_entered()
        dropped, kept = batcher.submit(torch.ones(1)), batcher.submit(torch.full((1,), 2.0))
        assert dropped.cancel()
        gated.release()
        assert kept.result(timeout=WAIT).item() == 5.0
        running.result(timeout=WAIT)
    assert [b[:, 0].tolist() for b in gated.batches] == [[0.0], [2.0]]
    assert batcher.stats().cancelled == 1


def test_close_times_out_on_a_hung_model_then_completes(gated):
    batcher = DynamicBatcher(gated, max_delay_ms=0)
    f = batcher.submit(torch.zeros(1))
    gated.wait_entered()
    with pytest.raises(TimeoutError, match=r"worker still running 0.05 s after close\(\)"):
        batcher.close(timeout=0.05)
    gated.release()
    batcher.close()
    assert f.result(timeout=0).item() == 1.0


def test_no_thread_outlives_the_batcher():
    baseline = threading.active_count()
    with DynamicBatcher(lambda x: x, max_delay_ms=0) as batcher:
        batcher.submit(torch.zeros(1)).result(timeout=WAIT)
        assert threading.active_count() == baseline + 1
    assert not batcher._worker.is_alive()
    assert threading.active_count() == baseline
    batcher.close()  # again: harmless


def _wait_for(predicate, timeout=WAIT):
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        done.wait(0.01)
    return False
