"""ResNet-50 (random weights) side by side: eager fp32, hand-tuned torch.compile, and torchopt's default recipe.

    python benchmarks/bench_recipes.py            # on the H100; writes benchmarks/results/recipes_<date>.{json,md}

Rows per batch size (1 and 32):
  eager-fp32        the unmodified model
  hand-compile      torch.compile(mode="reduce-overhead") on an fp16 channels_last copy (what an expert writes)
  torchopt-default  torchopt.optimize(model, "default") with a dynamic batch profile 1..64, no tuning

Target (issue 2): torchopt-default at least matches hand-compile (about 1.55 ms at b32 and 0.41 ms at b1 on an
H100) and reports its speedup over eager fp32. Also recorded: optimize wall time (compile time) and peak memory.
Timing: CUDA events through torchopt.profile.latency (median of >= 100 calls after warm-up); the hand-compile
row is timed the same way, so the comparison is like for like.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
from _ceilings import matmul_tflops

import torchopt
from torchopt._compat import import_torchvision
from torchopt.environment import environment
from torchopt.profile import latency

BATCHES = [1, 32]
# ResNet-50 at 224x224: 4.09 GMACs per image = 8.18 GFLOP (torchvision's model card).
FLOP_PER_IMAGE = 8.18e9
RESULTS = Path(__file__).parent / "results"


def _time(fn, x) -> dict:
    with torch.no_grad():
        res = latency(fn, x, warmup=20, iters=200, batch_size=x.shape[0])
    return {"p50_ms": res.p50_ms, "p99_ms": res.p99_ms, "throughput": res.throughput}


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_recipes needs a CUDA GPU (the targets are H100 numbers); nothing to measure here.")
        return 1
    dev = torch.device("cuda")
    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.resnet50(weights=None).eval()
    rows = []
    peak_tflops = matmul_tflops(dev)

    eager = copy.deepcopy(model).to(dev)
    hand = copy.deepcopy(model).to(dev).half().to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    hand_c = torch.compile(hand, mode="reduce-overhead")
    with torch.no_grad():
        for b in BATCHES:
            hand_c(torch.randn(b, 3, 224, 224, device=dev, dtype=torch.half).to(memory_format=torch.channels_last))
    torch.cuda.synchronize()
    hand_compile_s = time.perf_counter() - t0

    spec = torchopt.InputSpec("x", min=(1, 3, 224, 224), opt=(32, 3, 224, 224), max=(64, 3, 224, 224))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fast = torchopt.optimize(model, "default", inputs=[spec], device=dev)
    optimize_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    print(fast.report, file=sys.stderr)

    for b in BATCHES:
        x = torch.randn(b, 3, 224, 224, device=dev)
        xh = x.half().to(memory_format=torch.channels_last)
        base = _time(eager, x)
        entries = {
            "eager-fp32": base,
            "hand-compile": {**_time(hand_c, xh), "compile_s": hand_compile_s},
            "torchopt-default": {**_time(fast, x), "optimize_s": optimize_s, "peak_mem_bytes": peak},
        }
        for name, e in entries.items():
            e["speedup_vs_eager"] = base["p50_ms"] / e["p50_ms"]
            e["pct_of_fp16_matmul_peak"] = 100 * FLOP_PER_IMAGE * b / (e["p50_ms"] * 1e-3) / 1e12 / peak_tflops
            rows.append({"batch": b, "variant": name, **e})
        ratio = entries["hand-compile"]["p50_ms"] / entries["torchopt-default"]["p50_ms"]
        rows.append({"batch": b, "variant": "torchopt vs hand-compile (>1 = torchopt faster)", "ratio": ratio})

    meta = {
        **environment(),
        "measured_fp16_matmul_tflops": peak_tflops,
        "torchopt_backend": fast.report.backend,
        "torchopt_backend_reason": fast.report.backend_reason,
        "torchopt_precision": fast.report.precision,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"recipes_{meta['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        f"# ResNet-50 recipes — {meta['gpu']}, torch {meta['torch']}, {meta['date']}",
        "",
        f"fp16 matmul ceiling measured: {peak_tflops:.0f} TFLOP/s",
        "",
        "| batch | variant | p50 ms | p99 ms | speedup vs eager | % of fp16 peak | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ratio" in r:
            lines.append(f"| {r['batch']} | {r['variant']} | | | | | {r['ratio']:.2f}x |")
            continue
        note = ", ".join(f"{k}={v:.1f}" for k, v in r.items() if k.endswith("_s"))
        lines.append(
            f"| {r['batch']} | {r['variant']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} |"
            f" {r['speedup_vs_eager']:.2f}x | {r['pct_of_fp16_matmul_peak']:.1f} | {note} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
