"""torchopt.batch on a GPU: find_max_batch against the true maximum and Lightning's strategy, and
find_optimal_batch against a full sweep, all in one run.

    python benchmarks/bench_batch.py                 # ~3-4 minutes on an H100; writes benchmarks/results/
    python benchmarks/bench_batch.py --budget-gib 16 --workloads resnet50_fp16_infer

Workloads (torchvision, random weights): ResNet-50 fp16 inference and ViT-B/16 fp16 inference (channels-last,
under no_grad), and a ResNet-50 fp32 training step (forward + cross-entropy + backward + SGD with momentum).
The process's CUDA memory is capped at `--budget-gib` with ``torch.cuda.set_per_process_memory_fraction``:
the caching allocator then raises real out-of-memory errors past it, every search sees the same limit, the
batches stay below the 2**31-element tensors some kernels refuse, and the run stays short.

Per workload, side by side (each probe = 2 calls of the step at one size, the same for every method):

- **true max**: doubling from 1 to the first OOM, bisection to the exact boundary (an exhaustive scan would
  take thousands of runs), then the boundary confirmed: ``max`` runs again twice, ``max + 1`` fails twice;
- **ours**: `find_max_batch` twice. With ``headroom=0`` — the true max's budget, which has no headroom — it is
  judged: goals <= 4 probes after warm-up, within 5 % of the true max, the returned size was run (zero untested
  results) and memory returned to its baseline. With its defaults (256 MiB headroom below the cap) it is
  reported alongside, with the same probe, tested and memory goals; its wall time too;
- **baseline**: Lightning's ``binsearch`` strategy (start 2, double until OOM, then binary search until
  ``high - low <= 1``, at most 25 trials), with recovery after the ``except`` block; its trials and wall time;
- **optimal batch** (inference workloads): `find_optimal_batch` under a p99 budget against a full sweep of
  1, 2, 3, 4, 6, 8, 12, ... up to the true max with the same timing settings; goal: the chosen size's
  throughput, re-measured next to the sweep, within 5 % of the best size meeting the same budget.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchopt.batch import find_max_batch, find_optimal_batch
from torchopt.batch._calls import run_guarded
from torchopt.batch.memory_backends import release_memory
from torchopt.environment import environment
from torchopt.profile import latency
from torchopt.profile.files import write_json

RESULTS = Path(__file__).resolve().parent / "results"
CALLS_PER_PROBE = 2  # find_max_batch's default: the first call absorbs per-shape work, the second is measured
GOAL_PROBES = 4
GOAL_WITHIN_PCT = 5.0
GOAL_THROUGHPUT_PCT = 5.0
LIGHTNING_MAX_TRIALS = 25
# Timing of every size in both optimal-batch sweeps (identical so that the comparison is fair).
TIMING = {"warmup": 5, "iters": 50, "max_time_s": 3.0}


# ---------------------------------------------------------------------------------------------------------
# Workloads


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def build_workload(name: str) -> dict[str, Any]:
    """{'step': callable(*inputs), 'make': make_inputs(batch), 'inference': bool}."""
    from torchopt._compat import import_torchvision

    tv = import_torchvision()
    dev = torch.device("cuda")
    if name in ("resnet50_fp16_infer", "vit_b16_fp16_infer"):
        build = tv.models.resnet50 if name.startswith("resnet") else tv.models.vit_b_16
        model = build(weights=None).eval().to(dev, torch.float16)
        if name.startswith("resnet"):
            model = model.to(memory_format=torch.channels_last)

        def step(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model(x)

        def make(n: int) -> torch.Tensor:
            return _channels_last(torch.randn(n, 3, 224, 224, device=dev, dtype=torch.float16))

        return {"step": step, "make": make, "inference": True, "model": model}
    if name == "resnet50_fp32_train":
        model = tv.models.resnet50(weights=None).train().to(dev).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        def make_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = _channels_last(torch.randn(n, 3, 224, 224, device=dev))
            return x, torch.randint(0, 1000, (n,), device=dev)

        return {"step": train_step, "make": make_batch, "inference": False, "model": model, "opt": opt}
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")


WORKLOADS = ["resnet50_fp16_infer", "vit_b16_fp16_infer", "resnet50_fp32_train"]


def make_runner(step: Callable[..., Any], make: Callable[[int], Any]) -> Callable[[int], bool]:
    """runs(n) -> True if `step` runs CALLS_PER_PROBE times at batch n; OOMs are recovered outside `except`."""

    def runs(n: int) -> bool:
        def attempt() -> None:
            batch = make(n)
            args = batch if isinstance(batch, tuple) else (batch,)
            for _ in range(CALLS_PER_PROBE):
                step(*args)
            torch.cuda.synchronize()

        _, failure = run_guarded(attempt, n, "bench_batch", lambda: release_memory(torch.device("cuda")))
        release_memory(torch.device("cuda"))
        return failure is None

    return runs


# ---------------------------------------------------------------------------------------------------------
# Max batch: true max, Lightning's binsearch, ours


def true_max(runs: Callable[[int], bool], cap: int) -> dict[str, Any]:
    """The exact OOM boundary: doubling, bisection, then the boundary confirmed by re-running both sides."""
    t0 = time.perf_counter()
    lo, hi, n, probes = 0, None, 1, 0
    while hi is None and n <= cap:
        probes += 1
        if runs(n):
            lo, n = n, 2 * n
        else:
            hi = n
    if hi is None:
        raise RuntimeError(f"batch {lo} still fits under the cap {cap}: raise --cap or lower --budget-gib")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        probes += 1
        if runs(mid):
            lo = mid
        else:
            hi = mid
    confirmed = [runs(lo), runs(lo), not runs(lo + 1), not runs(lo + 1)]
    return {
        "size": lo,
        "probes": probes + 4,
        "confirmed": all(confirmed),
        "checks": confirmed,
        "seconds": time.perf_counter() - t0,
    }


def lightning_binsearch(runs: Callable[[int], bool], init: int = 2) -> dict[str, Any]:
    """Lightning's `binsearch` control flow (tuner/batch_size_scaling.py `_run_binary_scaling`)."""
    t0 = time.perf_counter()
    low, high, size, trials = 1, None, init, 0
    while True:
        trials += 1
        if runs(size):
            if trials > LIGHTNING_MAX_TRIALS:
                break
            low = size
            if high:
                if high - low <= 1:
                    break
                size = (high + low) // 2
            else:
                size *= 2
        else:
            high = size
            size = (high + low) // 2
            if high - low <= 1:
                break
    return {"size": size, "probes": trials, "seconds": time.perf_counter() - t0}


def _timed_search(step, make, cap: int, **options: Any):
    t0 = time.perf_counter()
    res = find_max_batch(step, make, max_batch=cap, progress=False, **options)
    return res, time.perf_counter() - t0


def _ours_row(res, seconds: float, truth_size: int) -> dict[str, Any]:
    return {
        "size": res.size,
        "headroom_bytes": res.headroom_bytes,
        "probes_after_warmup": res.num_probes,
        "ooms": res.num_ooms,
        "tested": res.tested,
        "memory_returned": res.memory_returned,
        "limited_by": res.limited_by,
        "enforced": res.enforced,
        "fitted_to": res.fitted_to,
        "allowance_bytes": res.allowance_bytes,
        "seconds": seconds,
        "below_true_max_pct": 100.0 * (truth_size - res.size) / truth_size,
        "result": res.to_dict(),
    }


def bench_max(name: str, work: dict[str, Any], cap: int) -> dict[str, Any]:
    step, make = work["step"], work["make"]
    runs = make_runner(step, make)
    # The true max below is the OOM boundary under the cap with no headroom: ours with headroom=0 searches the
    # same budget and is the one judged; ours with its default headroom is reported alongside.
    print(f"[{name}] ours: find_max_batch, headroom=0 ...", file=sys.stderr)
    ours0, ours0_seconds = _timed_search(step, make, cap, headroom=0)
    print(ours0, file=sys.stderr)
    print(f"[{name}] ours: find_max_batch, default headroom ...", file=sys.stderr)
    ours, ours_seconds = _timed_search(step, make, cap)
    print(ours, file=sys.stderr)
    print(f"[{name}] baseline: Lightning binsearch ...", file=sys.stderr)
    base = lightning_binsearch(runs)
    print(f"[{name}] true max: doubling + bisection + confirmation ...", file=sys.stderr)
    truth = true_max(runs, cap)
    row = {
        "true_max": truth,
        "ours_no_headroom": _ours_row(ours0, ours0_seconds, truth["size"]),
        "ours": _ours_row(ours, ours_seconds, truth["size"]),
        "baseline_lightning_binsearch": base,
    }
    within = row["ours_no_headroom"]["below_true_max_pct"]
    both = (ours0, ours)
    row["goals"] = {
        f"<= {GOAL_PROBES} probes after warm-up": all(r.num_probes <= GOAL_PROBES for r in both),
        f"headroom 0: within {GOAL_WITHIN_PCT:g} % of the true max": 0 <= within <= GOAL_WITHIN_PCT,
        "zero untested results": all(r.tested and r.size <= truth["size"] for r in both),
        "memory returned to baseline": all(r.memory_returned for r in both),
        "true max confirmed": truth["confirmed"],
    }
    return row


# ---------------------------------------------------------------------------------------------------------
# Optimal batch: ours vs a full sweep under the same p99 budget


def _grid(limit: int) -> list[int]:
    sizes, p = [], 1
    while p <= limit:
        sizes += [p] + ([p + p // 2] if p >= 2 and p + p // 2 <= limit else [])
        p *= 2
    return sorted(set(sizes))


def _measure(step, make, n: int) -> tuple[float, float]:
    """(p99 ms, items/s at the median) with the sweep's timing settings."""
    batch = make(n)
    args = batch if isinstance(batch, tuple) else (batch,)
    res = latency(step, *args, batch_size=n, **TIMING)
    return res.p99_ms, n * 1000.0 / res.p50_ms


def bench_optimal(name: str, work: dict[str, Any], max_fit: int, budget_ms: float) -> dict[str, Any]:
    step, make = work["step"], work["make"]
    print(f"[{name}] ours: find_optimal_batch (p99 <= {budget_ms} ms) ...", file=sys.stderr)
    t0 = time.perf_counter()
    ours = find_optimal_batch(
        step, make, latency_budget_ms=budget_ms, percentile=99, max_batch=max_fit, latency=TIMING, progress=False
    )
    ours_seconds = time.perf_counter() - t0
    print(ours, file=sys.stderr)
    print(f"[{name}] full sweep ...", file=sys.stderr)
    t0 = time.perf_counter()
    sweep, misses = [], 0
    for n in _grid(max_fit):
        p99, tput = _measure(step, make, n)
        sweep.append({"size": n, "p99_ms": p99, "throughput": tput, "meets_budget": p99 <= budget_ms})
        misses = misses + 1 if p99 > budget_ms else 0
        if misses >= 2:  # latency grows with the batch: two misses in a row end the sweep
            break
    sweep_seconds = time.perf_counter() - t0
    feasible = [s for s in sweep if s["meets_budget"]]
    best = max(feasible, key=lambda s: s["throughput"]) if feasible else None
    p99, tput = _measure(step, make, ours.size)  # re-measured next to the sweep, same settings
    ratio = 100.0 * tput / best["throughput"] if best else None
    return {
        "latency_budget_ms": budget_ms,
        "ours": {
            "size": ours.size,
            "sizes_measured": len(ours.points),
            "seconds": ours_seconds,
            "remeasured_p99_ms": p99,
            "remeasured_throughput": tput,
            "stop_reason": ours.stop_reason,
        },
        "full_sweep": {"best": best, "sizes_measured": len(sweep), "seconds": sweep_seconds, "points": sweep},
        "throughput_vs_best_pct": ratio,
        "goals": {
            f"throughput within {GOAL_THROUGHPUT_PCT:g} % of the full sweep's best": ratio is not None
            and ratio >= 100 - GOAL_THROUGHPUT_PCT,
            "chosen size meets the budget when re-measured": p99 <= budget_ms,
        },
    }


# ---------------------------------------------------------------------------------------------------------
# Report


def to_markdown(env: dict[str, Any], rows: list[dict[str, Any]], budget_gib: float) -> str:
    lines = [
        "# bench_batch: find_max_batch and find_optimal_batch",
        "",
        f"{env['gpu']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · {env['date']}",
        f"· memory capped at {budget_gib:g} GiB per process",
        "",
        "## Max batch",
        "",
        "| workload | true max | ours, headroom 0 (probes after warm-up, OOMs) | below true | ours s"
        " | ours, default headroom (probes, OOMs) | below true | ours s | Lightning binsearch (trials)"
        " | Lightning s | true-max search s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | error: {r['error']} | | | | | | | | | |")
            continue
        m = r["max"]
        t, z, o, b = m["true_max"], m["ours_no_headroom"], m["ours"], m["baseline_lightning_binsearch"]
        lines.append(
            f"| {r['workload']} | {t['size']}"
            f" | {z['size']} ({z['probes_after_warmup']}, {z['ooms']}) | {z['below_true_max_pct']:.1f} %"
            f" | {z['seconds']:.1f}"
            f" | {o['size']} ({o['probes_after_warmup']}, {o['ooms']}) | {o['below_true_max_pct']:.1f} %"
            f" | {o['seconds']:.1f} | {b['size']} ({b['probes']}) | {b['seconds']:.1f} | {t['seconds']:.1f} |"
        )
    lines += [
        "",
        "## Optimal batch (p99 budget)",
        "",
        "| workload | budget ms | ours: size, p99 ms, items/s | full sweep best: size, p99 ms, items/s | ours/best |"
        " ours s (sizes) | sweep s (sizes) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        opt = r.get("optimal")
        if not opt:
            continue
        o, f = opt["ours"], opt["full_sweep"]
        best = f["best"] or {"size": "-", "p99_ms": float("nan"), "throughput": float("nan")}
        ratio = "-" if opt["throughput_vs_best_pct"] is None else f"{opt['throughput_vs_best_pct']:.1f} %"
        lines.append(
            f"| {r['workload']} | {opt['latency_budget_ms']:g} | {o['size']}, {o['remeasured_p99_ms']:.2f},"
            f" {o['remeasured_throughput']:,.0f} | {best['size']}, {best['p99_ms']:.2f}, {best['throughput']:,.0f}"
            f" | {ratio} | {o['seconds']:.1f} ({o['sizes_measured']}) | {f['seconds']:.1f} ({f['sizes_measured']}) |"
        )
    lines += ["", "## Goals", ""]
    for r in rows:
        goals = {**r.get("max", {}).get("goals", {}), **r.get("optimal", {}).get("goals", {})}
        met = ", ".join(f"{'✅' if v else '❌'} {k}" for k, v in goals.items()) or f"not run: {r.get('error')}"
        lines.append(f"- **{r['workload']}**: {met}")
    lines += [
        "",
        "A probe runs the step twice at one size (the first call absorbs per-shape work). True max: the exact"
        " out-of-memory boundary under the cap, by bisection, confirmed by re-running max (ok) and max + 1"
        " (OOM) twice. Ours is judged with headroom=0, the true max's budget: its probes run with the caching"
        " allocator capped at the target (the per-process memory fraction, restored afterwards), so a probe"
        " either fits for real — the allocator frees its cache under pressure, as at the true max — or raises a"
        " real OOM; and its memory model is fitted to live-tensor bytes (`max_memory_allocated`, not the reserved"
        " peaks, which the cache inflates): it runs the size predicted to reach the target, and when the model"
        " sees no more room, one size `tolerance` (4 %) above — a failure there proves the result within 4 % of"
        " the boundary. After an OOM it aims lower by `fragmentation` (3 % of the target, doubled per OOM in a"
        " row) and bisects when the model is off. Where fragmentation persists under pressure (ViT-B/16: reserved"
        " stays ~25 % above live bytes at the limit) live-bytes predictions overshoot; there the OOM's own"
        " account (live + reserved-but-unallocated + requested bytes, from the caching allocator's message) is"
        " scaled down to the target, which lands the next probe below the boundary in one step. With its"
        " default 256 MiB headroom below the cap it searches a smaller budget, so it lands a further few"
        " percent below the true max; that row is reported, not judged on distance. Lightning's binsearch is"
        " re-implemented from its control flow (init 2, max 25 trials), with memory recovered after the"
        " `except` block. Throughput is items/s at the median latency; the chosen size is re-measured next to"
        " the full sweep with the same settings.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=WORKLOADS)
    parser.add_argument(
        "--budget-gib", type=float, default=8.0, help="cap on this process's CUDA memory (default: 8 GiB)"
    )
    parser.add_argument("--latency-budget-ms", type=float, default=30.0, help="p99 budget (default: 30 ms)")
    parser.add_argument("--cap", type=int, default=1 << 16, help="largest batch any search may run")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN autotuning on (default: off)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results directory (default: {RESULTS})")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_batch needs a CUDA GPU (none here); nothing was measured", file=sys.stderr)
        return 1
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    env = environment()
    total = torch.cuda.mem_get_info()[1]
    budget = args.budget_gib * 2**30
    if budget > total:
        raise SystemExit(f"--budget-gib {args.budget_gib} exceeds the device ({total / 2**30:.1f} GiB)")
    torch.cuda.set_per_process_memory_fraction(budget / total)
    t_start = time.perf_counter()
    rows = []
    for name in args.workloads:
        row: dict[str, Any] = {"workload": name}
        try:
            work = build_workload(name)
            row["max"] = bench_max(name, work, args.cap)
            if work["inference"]:
                max_fit = row["max"]["true_max"]["size"]
                row["optimal"] = bench_optimal(name, work, max_fit, args.latency_budget_ms)
        except (RuntimeError, ValueError) as exc:  # one workload failing must not lose the others' results
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            print(f"[{name}] failed: {row['error']}", file=sys.stderr)
        rows.append(row)
        work = None
        gc.collect()
        torch.cuda.empty_cache()
    env["seconds"] = round(time.perf_counter() - t_start, 1)
    env["memory_cap_gib"] = args.budget_gib
    env["cudnn_benchmark"] = args.cudnn_benchmark
    args.out.mkdir(parents=True, exist_ok=True)
    write_json({"environment": env, "results": rows}, args.out / "bench_batch.json")
    (args.out / "bench_batch.md").write_text(to_markdown(env, rows, args.budget_gib))
    print(to_markdown(env, rows, args.budget_gib))
    print(
        f"results: {args.out / 'bench_batch.json'}, {args.out / 'bench_batch.md'} ({env['seconds']} s)", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
