"""Why a served b1 call was slow on the H200 (`results/serve_notes.md`): the same optimized module called at batch
1 from the thread that compiled it, from a thread started for the purpose, and from the batcher's worker thread.

    python benchmarks/diag_serve_threads.py              # ResNet-50 fp16, the bench_serve workload, on CUDA
    python benchmarks/diag_serve_threads.py --device cpu # the CPU CNN: checks the script

For each caller, after 20 warm-up calls in that thread: the median wall time of 200 calls (the input moved to the
device and the answer back, as bench_serve's direct mode does), the first call's time in that thread, and the CUDA
kernels launched per call in a `torch.profiler` window (a replayed CUDA graph shows as one graph launch, not as
the model's kernels). torch.compile keeps CUDA graph trees per thread, so each new thread warms up and records
its own; what this prints is whether calls from such a thread ever reach replay.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from typing import Any

import torch
from bench_serve import WORKLOADS, item, optimize

from torchopt.environment import environment
from torchopt.serve import DynamicBatcher


def _timed(call, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def _kernels_per_call(call, device: str, n: int = 5) -> dict[str, float] | None:
    if device != "cuda":
        return None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            call()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    graphs = sum(1 for e in prof.events() if "cudaGraphLaunch" in e.name)
    return {"gpu_kernels": len(events) / n, "graph_launches": graphs / n}


def probe(call, device: str) -> dict[str, Any]:
    """Run in the calling thread: first call, warm-up, steady median, kernels per call."""
    first = _timed(call, 1)[0]
    _timed(call, 20)
    steady = _timed(call, 200)
    return {
        "first_call_ms": first * 1e3,
        "median_ms": statistics.median(steady) * 1e3,
        "p99_ms": sorted(steady)[int(0.99 * len(steady))] * 1e3,
        **(_kernels_per_call(call, device) or {}),
    }


def in_new_thread(fn) -> Any:
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.update(out=fn()))
    t.start()
    t.join()
    return box["out"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workload", default=None, help="a bench_serve workload (default: by device)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, as bench_serve sets them")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = args.workload or ("resnet50_fp16" if args.device == "cuda" else "cnn_cpu")
    eager, spec, dtype = WORKLOADS[name]()
    fast = optimize(eager, spec, dtype, args.device, 20.0)
    x = item(fast.profiles[0][0], 0)

    def direct() -> torch.Tensor:
        with torch.no_grad():
            return fast(x.to(args.device)).cpu()

    print(environment(), file=sys.stderr)
    rows = {"compiling thread": probe(direct, args.device)}
    rows["new thread"] = in_new_thread(lambda: probe(direct, args.device))
    rows["second new thread"] = in_new_thread(lambda: probe(direct, args.device))
    with DynamicBatcher(fast, max_batch=8, max_delay_ms=0) as batcher:
        rows["batcher worker (caller in a new thread)"] = in_new_thread(
            lambda: probe(lambda: batcher(x[0].to(args.device)).cpu(), args.device)
        )
    print(f"{name} on {args.device}, batch 1 (backend {fast.report.backend})")
    for caller, r in rows.items():
        extra = "".join(f", {k} {v:.1f}" for k, v in r.items() if k in ("gpu_kernels", "graph_launches"))
        print(
            f"  {caller:<42} first {r['first_call_ms']:8.2f} ms, median {r['median_ms']:.3f} ms,"
            f" p99 {r['p99_ms']:.3f} ms{extra}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
