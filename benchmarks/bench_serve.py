"""torchopt.serve in-process: per-request model calls against `DynamicBatcher` at concurrency 1, 8 and 64.

    python benchmarks/bench_serve.py                       # CPU MLP; writes benchmarks/results/bench_serve.*
    python benchmarks/bench_serve.py --device cuda --requests 4000

Each client thread sends its requests one after another (closed loop): `direct` calls the model on a batch of
one under a lock (one model call at a time, as a shared model would be used without a batcher), `batcher`
submits to one `DynamicBatcher` and waits for the result. Reported per mode and concurrency: throughput
(requests/s) and per-request p50/p99 latency, as the median of `--repeats` runs with their min-max spread; a
spread wider than 10 % of the median is labelled unstable. Goal from issue 14: at concurrency 1 the batcher
adds at most 5 % to a direct call's p50.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import torch

from torchopt.environment import environment
from torchopt.profile.files import write_json
from torchopt.serve import DynamicBatcher

RESULTS = Path(__file__).resolve().parent / "results"
CONCURRENCY = (1, 8, 64)
GOAL_OVERHEAD_PCT = 5.0
UNSTABLE_SPREAD_PCT = 10.0


def _model(device: str) -> torch.nn.Module:
    return (
        torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).eval().to(device)
    )


def _run(clients: int, requests: int, call) -> tuple[float, list[float]]:
    """Closed-loop clients sharing `requests`; returns (requests/s, latencies in seconds)."""
    per_client = max(1, requests // clients)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        x = torch.randn(256)
        barrier.wait()
        for _ in range(per_client):
            t0 = time.perf_counter()
            call(x)
            latencies[k].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    flat = [v for lat in latencies for v in lat]
    return len(flat) / elapsed, flat


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1e3


def _summary(samples: list[float]) -> dict[str, float | bool]:
    med = statistics.median(samples)
    spread = (max(samples) - min(samples)) / med * 100 if med else 0.0
    return {"median": med, "min": min(samples), "max": max(samples), "unstable": spread > UNSTABLE_SPREAD_PCT}


def bench(device: str, requests: int, repeats: int, max_delay_ms: float) -> dict:
    model = _model(device)
    lock = threading.Lock()

    def direct(x: torch.Tensor) -> torch.Tensor:
        with lock, torch.no_grad():
            return model(x.to(device)[None])[0]

    rows = []
    for clients in CONCURRENCY:
        for mode in ("direct", "batcher"):
            runs = []
            for _ in range(repeats):
                if mode == "direct":
                    _run(clients, requests // 10, direct)  # warm-up
                    runs.append(_run(clients, requests, direct))
                else:
                    with DynamicBatcher(model, max_batch=64, max_delay_ms=max_delay_ms) as batcher:
                        call = lambda x, b=batcher: b.submit(x.to(device)).result()  # noqa: E731
                        _run(clients, requests // 10, call)
                        runs.append(_run(clients, requests, call))
            rows.append(
                {
                    "mode": mode,
                    "concurrency": clients,
                    "throughput_per_s": _summary([r[0] for r in runs]),
                    "p50_ms": _summary([_pct(r[1], 50) for r in runs]),
                    "p99_ms": _summary([_pct(r[1], 99) for r in runs]),
                }
            )
    one = {r["mode"]: r["p50_ms"]["median"] for r in rows if r["concurrency"] == 1}
    overhead = (one["batcher"] / one["direct"] - 1) * 100
    return {
        "environment": environment(),
        "device": device,
        "requests": requests,
        "repeats": repeats,
        "max_delay_ms": max_delay_ms,
        "rows": rows,
        "overhead_c1_pct": overhead,
        "goal_overhead_pct": GOAL_OVERHEAD_PCT,
        "goal_met": overhead <= GOAL_OVERHEAD_PCT,
    }


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [
        "# bench_serve: per-request calls vs DynamicBatcher",
        "",
        f"{env['date']}, torch {env['torch']}, device {res['device']} ({env.get('gpu') or env['cpu']},"
        f" {env['cpu_count']} CPUs); {res['requests']} requests per run, median of {res['repeats']} runs"
        f" [min-max]; max_delay_ms={res['max_delay_ms']}.",
        "",
        "| mode | concurrency | requests/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]

    def cell(s: dict) -> str:
        mark = " (unstable)" if s["unstable"] else ""
        return f"{s['median']:.4g} [{s['min']:.4g}-{s['max']:.4g}]{mark}"

    for r in res["rows"]:
        lines.append(
            f"| {r['mode']} | {r['concurrency']} | {cell(r['throughput_per_s'])} | {cell(r['p50_ms'])}"
            f" | {cell(r['p99_ms'])} |"
        )
    verdict = "met" if res["goal_met"] else "NOT met"
    lines += [
        "",
        f"Batcher overhead at concurrency 1 (p50): {res['overhead_c1_pct']:+.1f} %"
        f" (goal <= {res['goal_overhead_pct']:.0f} %: {verdict}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-delay-ms", type=float, default=0.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    res = bench(args.device, args.requests, args.repeats, args.max_delay_ms)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(res, args.out / "bench_serve.json")
    text = markdown(res)
    (args.out / "bench_serve.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
