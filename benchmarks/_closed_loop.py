"""Closed-loop load for the serving benchmarks: client threads, each sending one request after another, started
once and kept across every run (warm-up and timed), as an application's threads live; torch.compile records
CUDA graphs per thread, so fresh threads per run would time their recording.

`closed_loops` runs the threads in this process. `closed_loops_in_processes` spreads them over processes, for a
client that holds the GIL for much of a request (tritonclient serializing a tensor): 64 threads of one interpreter
then measure the interpreter, not the server. Every thread of every process starts each run together and the
main process times from the start of the run to the end of its last request. A client's error stops every run and
is raised in the main process.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

BARRIER_TIMEOUT_S = 600.0  # a client process that died leaves the others waiting at most this long


def run_clients(
    first: int, count: int, total: int, runs: list[int], make_caller: Callable, start: Any, end: Any
) -> tuple[list[list[float]], list[BaseException]]:
    """`count` client threads (clients ``first`` .. ``first + count - 1`` of `total`), each building its caller
    once; per run, each sends ``run // total`` requests between the `start` and `end` barriers. Returns the
    latencies (seconds) of each run and the clients' errors."""
    latencies: list[list[list[float]]] = [[[] for _ in range(count)] for _ in runs]
    errors: list[BaseException] = []

    def client(j: int) -> None:
        try:
            call = make_caller(first + j)
            for r, n in enumerate(runs):
                start.wait(BARRIER_TIMEOUT_S)
                for _ in range(max(1, n // total)):
                    t0 = time.perf_counter()
                    call()
                    latencies[r][j].append(time.perf_counter() - t0)
                end.wait(BARRIER_TIMEOUT_S)
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the main process, which raises it
            errors.append(exc)
            start.abort()
            end.abort()

    threads = [threading.Thread(target=client, args=(j,), daemon=True) for j in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [[v for lat in run for v in lat] for run in latencies], errors


def _time_runs(n_runs: int, start: Any, end: Any) -> list[float]:
    """The main side of the barriers: the seconds from each run's start to its last request's end."""
    elapsed = []
    for _ in range(n_runs):
        start.wait(BARRIER_TIMEOUT_S)
        t0 = time.perf_counter()
        end.wait(BARRIER_TIMEOUT_S)
        elapsed.append(time.perf_counter() - t0)
    return elapsed


def _results(elapsed: list[float], latencies: list[list[float]]) -> list[dict[str, Any]]:
    return [{"requests_per_s": len(lat) / s, "latencies_s": lat} for s, lat in zip(elapsed, latencies, strict=True)]


def closed_loops(clients: int, runs: list[int], make_caller: Callable[[int], Callable[[], Any]]) -> list[dict]:
    """`clients` threads of this process run one closed loop per entry of `runs` (that many requests shared by
    the clients); per run, requests/s and every call's latency in seconds."""
    start, end = threading.Barrier(clients + 1), threading.Barrier(clients + 1)
    box: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: box.update(out=run_clients(0, clients, clients, runs, make_caller, start, end)), daemon=True
    )
    worker.start()
    try:
        elapsed = _time_runs(len(runs), start, end)
    except threading.BrokenBarrierError:
        worker.join(BARRIER_TIMEOUT_S)
        errors = box.get("out", ([], []))[1]
        raise RuntimeError(f"a client failed: {errors[0]!r}" if errors else "a client stalled") from (
            errors[0] if errors else None
        )
    worker.join()
    return _results(elapsed, box["out"][0])


def _process_main(first, count, total, runs, factory, factory_args, start, end, out) -> None:
    """A client process: `count` threads with callers from ``factory(*factory_args)``; its latencies and errors
    (as text: an exception may not pickle) go to `out`."""
    latencies, errors = run_clients(first, count, total, runs, factory(*factory_args), start, end)
    out.put((latencies, [repr(e) for e in errors]))


def _drain(out: Any, n: int) -> list[Any]:
    """Up to `n` reports the client processes managed to send after a run broke off."""
    reports = []
    for _ in range(n):
        try:
            reports.append(out.get(timeout=5))
        except queue.Empty:
            break
    return reports


def closed_loops_in_processes(
    procs: int, clients: int, runs: list[int], factory: Callable, factory_args: tuple
) -> list[dict[str, Any]]:
    """As `closed_loops`, with the `clients` threads spread over `procs` spawned processes; each process builds
    its callers with ``factory(*factory_args)`` (both picklable: a module-level function and plain values)."""
    ctx = multiprocessing.get_context("spawn")
    start, end, out = ctx.Barrier(clients + 1), ctx.Barrier(clients + 1), ctx.Queue()
    sizes = [clients // procs + (i < clients % procs) for i in range(procs)]
    firsts = [sum(sizes[:i]) for i in range(procs)]
    workers = [
        ctx.Process(
            target=_process_main,
            args=(first, size, clients, runs, factory, factory_args, start, end, out),
            daemon=True,
        )
        for first, size in zip(firsts, sizes, strict=True)
        if size
    ]
    for w in workers:
        w.start()
    try:
        elapsed = _time_runs(len(runs), start, end)
        reports = [out.get(timeout=BARRIER_TIMEOUT_S) for _ in workers]
    except threading.BrokenBarrierError:
        errors = [e for _, errs in _drain(out, len(workers)) for e in errs]
        raise RuntimeError(f"a client failed: {errors[0]}" if errors else "a client process stalled or died") from None
    finally:
        for w in workers:
            w.join(timeout=30)
    return _results(elapsed, [[v for lat, _ in reports for v in lat[r]] for r in range(len(runs))])
