"""torchopt.profile.compare_latency on a fake clock: paired rounds, the spread, drift, stability, errors."""

import pytest

import torchopt.profile as tp


class FakeClock:
    """A nanosecond clock that advances only when a fake model "runs" (deterministic latencies)."""

    def __init__(self):
        self.now = 0
        self.calls = 0
        self.drift_ns = 0  # every call of any model gets this much slower than the previous one

    def __call__(self) -> int:
        return self.now

    def model(self, ms: float):
        def run(*_args):
            self.now += int(ms * 1e6) + self.drift_ns * self.calls
            self.calls += 1

        return run


def test_twice_as_fast_is_exactly_two():
    clock = FakeClock()
    cmp = tp.compare_latency(
        {"slow": clock.model(4.0), "fast": clock.model(2.0)}, rounds=6, iters=3, min_round_ms=0, timer=clock
    )
    s = cmp.speedups["fast"]
    assert (s.median, s.low, s.high, s.rounds, s.stable) == (2.0, 2.0, 2.0, 6, True)
    assert cmp.results["slow"].p50_ms == 4.0 and cmp.results["fast"].p50_ms == 2.0
    assert cmp.results["fast"].iters == 18 and str(s) == "2.00x (2.00–2.00)"


def test_alternating_rounds_cancel_a_drift_that_a_sequential_measurement_would_report():
    # The machine slows down steadily (another process starts): the same model timed before and after
    # reads as 'faster' when measured in sequence; in alternating rounds the ratio straddles 1.0.
    clock = FakeClock()
    clock.drift_ns = 40_000
    same = clock.model(5.0)
    before = tp.latency(same, warmup=1, iters=30, max_iters=30, timer=clock, device="cpu")
    after = tp.latency(same, warmup=1, iters=30, max_iters=30, timer=clock, device="cpu")
    assert before.p50_ms / after.p50_ms < 0.9  # the bias this module exists to avoid

    clock = FakeClock()
    clock.drift_ns = 40_000
    cmp = tp.compare_latency(
        {"a": clock.model(5.0), "b": clock.model(5.0)}, rounds=10, iters=3, min_round_ms=0, timer=clock
    )
    s = cmp.speedups["b"]
    assert s.contains(1.0), s
    assert abs(s.median - 1.0) < 0.01


def test_a_noisy_round_widens_the_spread_and_marks_the_speedup_unstable():
    clock = FakeClock()
    base = clock.model(4.0)
    ms = iter([2.0] * 9 + [4.0] * 3 + [2.0] * 9 + [1.0] * 3 + [2.0] * 100)

    def cand(*_args):
        clock.now += int(next(ms) * 1e6)

    cmp = tp.compare_latency({"base": base, "cand": cand}, rounds=10, iters=3, warmup=0, timer=clock)
    s = cmp.speedups["cand"]
    assert s.low < 2.0 < s.high and s.median == 2.0
    assert not s.stable and str(s).endswith("UNSTABLE")
    assert cmp.to_dict()["speedup"]["cand"]["stable"] is False


def test_baseline_and_call_by_call_alternation():
    clock = FakeClock()
    order = []

    def named(name, ms):
        run = clock.model(ms)
        return lambda *a: (order.append(name), run())

    cmp = tp.compare_latency(
        {"a": named("a", 1.0), "b": named("b", 3.0)}, baseline="b", rounds=3, iters=1, warmup=0, timer=clock
    )
    assert order == ["a", "b", "b", "a", "a", "b"]  # the order alternates call by call
    assert (
        cmp.baseline == "b" and set(cmp.speedups) == {"a"} and cmp.speedups["a"].median == 3.0
    )  # b takes 3 ms, a 1 ms


def test_fast_callables_get_longer_rounds():
    clock = FakeClock()
    cmp = tp.compare_latency(
        {"a": clock.model(0.5), "b": clock.model(4.0)}, rounds=2, iters=3, warmup=2, min_round_ms=20, timer=clock
    )
    assert cmp.iters_per_round == 5  # 20 ms of the slower one per round
    assert cmp.results["a"].iters == 10 and cmp.speedups["b"].median == 0.125


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"fns": {"a": len}}, ValueError, r"at least two callables.*\['a'\]"),
        ({"fns": [len, len]}, TypeError, "fns must be a dict of name -> callable, got list"),
        ({"fns": {"a": len, "b": 3}}, TypeError, r"fns\['b'\] must be callable, got int"),
        ({"fns": {"a": len, "b": len}, "baseline": "c"}, ValueError, r"baseline 'c' is not one of .*\['a', 'b'\]"),
        ({"fns": {"a": len, "b": len}, "rounds": 0}, ValueError, "rounds must be > 0, got 0"),
        ({"fns": {"a": len, "b": len}, "iters": 1.5}, TypeError, "iters must be int, got float"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        tp.compare_latency(**kwargs)


def test_latency_takes_an_injected_timer():
    clock = FakeClock()
    res = tp.latency(clock.model(7.5), warmup=2, iters=6, timer=clock, device="cpu")
    assert res.samples_ms == [7.5] * 6 and res.stable
