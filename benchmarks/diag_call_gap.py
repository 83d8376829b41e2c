"""Why a served b1 call costs more CPU than the same call in a loop (`results/serve_notes.md`): the CPU workload's
batch-1 call timed back to back, and after a gap in which the core sleeps, spins in Python or sweeps memory, the
way a Python-backend stub's core waits for a request and runs the server's and the client's code between calls.

    python benchmarks/diag_call_gap.py            # writes results/diag_call_gap.{md,json}

A diagnostic, not a benchmark: one process, one torch thread, the eager `cnn_cpu` module of `bench_serve` (the
ops the stub runs). Each round times every gap in turn (N calls each, after warm-up); the figure is the median over
rounds of each round's median call time, wall and thread CPU, with the rounds' range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _results import write_results
from bench_serve import cnn_cpu

from torchopt.environment import environment


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def gaps() -> dict[str, Callable[[], object]]:
    sweep = torch.empty(64 * 2**20 // 4)  # 64 MiB: twice this machine's L3
    return {
        "none (back to back)": lambda: None,
        "sleep 1 ms": lambda: time.sleep(0.001),
        "sleep 5 ms": lambda: time.sleep(0.005),
        "sleep 20 ms": lambda: time.sleep(0.020),
        "spin 5 ms (Python loop)": lambda: _spin(0.005),
        "spin 20 ms (Python loop)": lambda: _spin(0.020),
        "sweep 64 MiB": lambda: sweep.add_(1),
    }


def timed_calls(call: Callable[[], object], gap: Callable[[], object], n: int) -> tuple[float, float]:
    """Median wall and thread-CPU milliseconds of `n` calls of `call`, each after `gap()`."""
    wall, cpu = [], []
    for _ in range(n):
        gap()
        t0, c0 = time.perf_counter(), time.thread_time()
        call()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def measure(rounds: int, n: int) -> dict[str, dict[str, list[float]]]:
    model, spec, _ = cnn_cpu()
    x = torch.randn(1, *spec.min[1:])
    table = gaps()
    out: dict[str, dict[str, list[float]]] = {name: {"wall_ms": [], "cpu_ms": []} for name in table}
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        for r in range(rounds):
            for name, gap in table.items():
                wall, cpu = timed_calls(lambda: model(x), gap, n)
                out[name]["wall_ms"].append(wall)
                out[name]["cpu_ms"].append(cpu)
            print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    return out


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}–{max(values):.3f}]"


def header(env: dict, loads: tuple[float, float]) -> str:
    return (
        f"{env['date']} · CPU ({env['cpu_count']} cores, {env['cpu']}) · torch {env['torch']} · Python {env['python']}"
        f" · 1-minute load average {loads[0]:.2f} (start), {loads[1]:.2f} (end)"
    )


def markdown(data: dict[str, dict[str, list[float]]], env: str, rounds: int, n: int) -> str:
    base = statistics.median(data["none (back to back)"]["cpu_ms"])
    lines = [
        "# diag_call_gap: the CPU workload's b1 call after a gap (a diagnostic)",
        "",
        f"{env}. Eager `cnn_cpu`, batch 1, 1 torch thread; median of {rounds} rounds [min–max] of each round's median"
        f" over {n} calls.",
        "",
        "| before each call | wall ms | thread CPU ms | CPU vs back to back |",
        "|---|---|---|---|",
    ]
    for name, d in data.items():
        ratio = statistics.median(d["cpu_ms"]) / base
        lines.append(f"| {name} | {_cell(d['wall_ms'])} | {_cell(d['cpu_ms'])} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200, help="timed calls per gap and round")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    env, start = environment(), os.getloadavg()[0]
    data = measure(args.rounds, args.calls)
    head = header(env, (start, os.getloadavg()[0]))
    md = markdown(data, head, args.rounds, args.calls)
    write_results(
        {"environment": env, "rounds": args.rounds, "calls": args.calls, "gaps": data}, md, args.out, "diag_call_gap"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
