"""One dynamic-shape profile vs one static compile per size (Inductor), and TensorRT where it imports.

    python benchmarks/bench_dynamic_shapes.py          # H100, ~5-7 minutes; writes benchmarks/results/
    python benchmarks/bench_dynamic_shapes.py --smoke  # tiny models, any device: checks the script end to end

Models (random weights, float16 on CUDA):
  resnet50   torchvision ResNet-50, input x (B, 3, 224, 224), profile batch 1–64
  bert-base  nn.TransformerEncoder, d=768, 12 heads, 12 layers, FFN 3072, input x (B, S, 768) hidden states,
             profile batch 1–64 × sequence 16–512

Rows per model and size, side by side in one run:
  eager      the fp16 model as is
  static     torch.compile(mode="reduce-overhead", dynamic=False), compiled fresh for that size (what serving
             one engine per shape costs: one compile per size)
  dynamic    torchopt.optimize(model, Inductor, one profile over the whole range): compiled once, before the
             first request; its recompiles while serving every measured size are counted (expected: 0)
  tensorrt   torchopt.optimize(..., backend tensorrt, the same profile); "not measurable here" when
             torch_tensorrt or TensorRT is absent (it cannot be installed on the machines of this project)

Latency: median of CUDA-event timings (torchopt.profile.latency) after warm-up. Percent of the hardware limit:
the model's FLOPs at that size (torch.utils.flop_counter) per second over the measured fp16 matmul ceiling.
Compile time: wall time of the compile (static: first calls at that size; dynamic: optimize's compile step,
which warms up every graph the profile needs). Recompiles: dynamo's unique-graph counter.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _ceilings import matmul_tflops

import torchopt
from torchopt import InputSpec, Recipe
from torchopt.environment import environment
from torchopt.profile import latency
from torchopt.profile.files import write_json
from torchopt.recipes import CastConfig, CompileConfig, ValidateConfig

RESULTS = Path(__file__).resolve().parent / "results"
# Sizes measured per model: both ends of the profile and one between the warm-up points, few enough that the
# per-size static compiles (the expensive column, ~30-60 s each on an H100) fit the 8-minute budget.
RESNET_BATCHES = [1, 29, 64]
BERT_SHAPES = [(1, 16), (29, 200), (64, 512)]


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward. Grad stays enabled: under no_grad nn.TransformerEncoder takes its fused fast path,
    which the counter does not see."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[..., Any], x: torch.Tensor, iters: int) -> dict[str, float]:
    with torch.no_grad():
        res = latency(fn, x, warmup=5, iters=iters, batch_size=x.shape[0])
    return {"p50_ms": res.p50_ms, "p99_ms": res.p99_ms}


def build_models(smoke: bool) -> dict[str, dict[str, Any]]:
    """name → {model, spec (the one profile), shapes (measured input shapes)}."""
    if smoke:
        conv = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, 10),
        )
        layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
        enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        return {
            "smoke-conv": {
                "model": conv,
                "spec": InputSpec("input", min=(1, 3, 16, 16), opt=(4, 3, 16, 16), max=(8, 3, 16, 16)),
                "shapes": [(1, 3, 16, 16), (5, 3, 16, 16)],
            },
            "smoke-encoder": {
                "model": enc,
                "spec": InputSpec("src", min=(1, 8, 32), opt=(2, 16, 32), max=(4, 32, 32)),
                "shapes": [(1, 8, 32), (3, 20, 32)],
            },
        }
    from torchopt._compat import import_torchvision

    resnet = import_torchvision().models.resnet50(weights=None)
    layer = torch.nn.TransformerEncoderLayer(
        768, 12, dim_feedforward=3072, batch_first=True, dropout=0.0, activation="gelu"
    )
    bert = torch.nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
    return {
        "resnet50": {
            "model": resnet,
            "spec": InputSpec("x", min=(1, 3, 224, 224), opt=(16, 3, 224, 224), max=(64, 3, 224, 224)),
            "shapes": [(b, 3, 224, 224) for b in RESNET_BATCHES],
        },
        "bert-base": {
            "model": bert,
            "spec": InputSpec("src", min=(1, 16, 768), opt=(8, 128, 768), max=(64, 512, 768)),
            "shapes": [(b, s, 768) for b, s in BERT_SHAPES],
        },
    }


def _recipe(backend: str, dtype: str) -> Recipe:
    return Recipe(
        [CastConfig(dtype=dtype), CompileConfig(backend=backend), ValidateConfig(measure_latency=False)],
        name=f"{backend}-{dtype}",
    )


def _optimize(model, backend: str, dtype: str, spec: InputSpec, device: torch.device):
    torch._dynamo.reset()
    before = _graphs()
    t0 = time.perf_counter()
    fast = torchopt.optimize(model, _recipe(backend, dtype), inputs=[spec], device=device, progress=False)
    _sync(device)
    compile_s = next(s.seconds for s in fast.report.steps if s.step == "compile")
    return fast, {
        "compile_s": compile_s,
        "optimize_s": time.perf_counter() - t0,
        "graphs_built": _graphs() - before,
        "accuracy": fast.report.accuracy,
    }


def bench_model(
    name: str, entry: dict[str, Any], device: torch.device, dtype: torch.dtype, peak: float | None, iters: int
) -> list[dict[str, Any]]:
    from torchopt._compat import tensorrt_status

    model = entry["model"].eval()
    spec, shapes = entry["spec"], entry["shapes"]
    dtype_name = str(dtype).removeprefix("torch.")
    eager = copy.deepcopy(model).to(device, dtype)
    xs = {s: torch.randn(s, device=device, dtype=dtype) for s in shapes}
    flops = {s: _flops(eager, x) for s, x in xs.items()}
    rows: list[dict[str, Any]] = []

    def add(variant: str, shape, timing: dict[str, float], **extra) -> None:
        row = {"model": name, "shape": list(shape), "variant": variant, **timing, **extra}
        if peak and "p50_ms" in timing:
            row["pct_of_fp16_matmul_peak"] = 100 * flops[shape] / (timing["p50_ms"] * 1e-3) / 1e12 / peak
        rows.append(row)

    eager_ms = {}
    for s, x in xs.items():
        t = _time(eager, x, iters)
        eager_ms[s] = t["p50_ms"]
        add("eager", s, t)

    mode = "reduce-overhead" if device.type == "cuda" else "default"
    for s, x in xs.items():
        torch._dynamo.reset()
        before = _graphs()
        t0 = time.perf_counter()
        static = torch.compile(copy.deepcopy(eager), mode=mode, dynamic=False)
        with torch.no_grad():
            for _ in range(3):  # CUDA graphs record on the second call
                static(x)
        _sync(device)
        compile_s = time.perf_counter() - t0
        add("static", s, _time(static, x, iters), compile_s=compile_s, graphs_built=_graphs() - before)
        print(f"[{name}] static {s}: compiled in {compile_s:.1f} s", file=sys.stderr)

    fast, info = _optimize(model, "inductor", dtype_name, spec, device)
    print(f"[{name}] dynamic profile: compiled in {info['compile_s']:.1f} s", file=sys.stderr)
    serving_before = _graphs()
    for s, x in xs.items():
        add(
            "dynamic",
            s,
            _time(fast, x, iters),
            **({"compile_s": info["compile_s"], "graphs_built": info["graphs_built"]} if s == shapes[0] else {}),
        )
    recompiles = _graphs() - serving_before
    for r in rows:
        if r["variant"] == "dynamic":
            r["recompiles_while_serving"] = recompiles

    trt, why = tensorrt_status() if device.type == "cuda" else (None, f"no CUDA device ({device})")
    if trt is None:
        rows.append({"model": name, "shape": None, "variant": "tensorrt", "note": f"not measurable here: {why}"})
    else:
        fast_trt, trt_info = _optimize(model, "tensorrt", dtype_name, spec, device)
        for s, x in xs.items():
            add(
                "tensorrt",
                s,
                _time(fast_trt, x, iters),
                **({"compile_s": trt_info["compile_s"]} if s == shapes[0] else {}),
            )

    for r in rows:
        if "p50_ms" in r:
            r["speedup_vs_eager"] = eager_ms[tuple(r["shape"])] / r["p50_ms"]
    return rows


def _markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    env = meta["environment"]
    ceiling = f"{meta['fp16_matmul_tflops']:.0f} TFLOP/s" if meta["fp16_matmul_tflops"] else "none (no GPU)"
    lines = [
        f"# Dynamic shapes: one profile vs per-size static compiles — {env.get('gpu') or env['cpu']},"
        f" torch {env['torch']}, triton {env['triton']}, {env['date']}",
        "",
        f"dtype {meta['dtype']}; measured fp16 matmul ceiling: {ceiling}",
        "",
        "| model | shape | variant | p50 ms | p99 ms | vs eager | % of fp16 peak | compile s | graphs | recompiles"
        " serving | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in rows:
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['shape'])) if r.get('shape') else ''} | {r['variant']} |"
            f" {f(r.get('p50_ms'), '.3f')} | {f(r.get('p99_ms'), '.3f')} | {f(r.get('speedup_vs_eager'), '.2f')}"
            f"{'x' if r.get('speedup_vs_eager') else ''} | {f(r.get('pct_of_fp16_matmul_peak'), '.1f')} |"
            f" {f(r.get('compile_s'), '.1f')} | {r.get('graphs_built', '')} | {r.get('recompiles_while_serving', '')}"
            f" | {r.get('note', '')} |"
        )
    totals = {}
    for r in rows:
        if r.get("compile_s") is not None:
            key = (r["model"], r["variant"])
            totals[key] = totals.get(key, 0.0) + r["compile_s"]
    lines += ["", "Total compile time per model (static: one compile per measured size):", ""]
    lines += [f"- {m} {v}: {s:.1f} s" for (m, v), s in totals.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models, 2 sizes: checks the script anywhere")
    parser.add_argument("--models", default=None, help="comma-separated subset (resnet50,bert-base)")
    parser.add_argument("--iters", type=int, default=50, help="timed calls per row")
    parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/bench_dynamic_shapes)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench_dynamic_shapes needs a CUDA GPU (H100 numbers); use --smoke to check it on CPU.")
        return 1
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    torch.manual_seed(0)
    models = build_models(args.smoke)
    if args.models:
        wanted = args.models.split(",")
        unknown = sorted(set(wanted) - set(models))
        if unknown:
            parser.error(f"--models: unknown {unknown}; choose from {sorted(models)}")
        models = {k: v for k, v in models.items() if k in wanted}
    peak = matmul_tflops(device)
    rows: list[dict[str, Any]] = []
    for name, entry in models.items():
        rows += bench_model(name, entry, device, dtype, peak, args.iters)
    meta = {
        "environment": environment(),
        "dtype": str(dtype).removeprefix("torch."),
        "fp16_matmul_tflops": peak,
        "smoke": args.smoke,
        "profiles": {k: v["spec"].to_dict() for k, v in models.items()},
    }
    stem = Path(args.out) if args.out else RESULTS / ("bench_dynamic_shapes" + ("_smoke" if args.smoke else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json({"meta": meta, "rows": rows}, stem.with_suffix(".json"))
    text = _markdown(meta, rows)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
