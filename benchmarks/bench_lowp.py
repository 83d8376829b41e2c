"""Real FP8 / INT8 execution without TensorRT (issue 15), side by side in one run on a GPU:

    python benchmarks/bench_lowp.py                         # the issue's grid on a CUDA GPU (H200); ~8 minutes
    python benchmarks/bench_lowp.py --smoke --device cpu    # tiny shapes on the CPU: checks the script, no figures

Per model and shape (random weights, seeded; no pretrained weights can be downloaded on the lent machine):

    eager fp16          the float model cast to fp16
    compiled fp16       torch.compile of it: the baseline every ratio is against
    fake-quant          ModelOpt's Q/DQ simulation (fp8 and int8 calibrated), eager: what users got before
    fp8 / fp8_rowwise   `torchopt.quantize.deploy` of the FP8-calibrated model, compiled
    fp8 fast-accum      the deployed fp8 model with Hopper's FP8 fast accumulation in its GEMMs (`use_fast_accum`)
    int8 / int8_wo      the same from the INT8-calibrated model (W8A8 `_int_mm`, weight-only int8)
    int4_weight_only    from the INT4-AWQ-calibrated model (tinygemm `_weight_int4pack_mm`)

with latency p50/p99 (`torchopt.profile.compare_latency`: warm-up, then call-by-call alternating rounds, so that
clocks and load hit every variant alike), throughput, the speedup over compiled fp16 as the median of per-round
ratios with the middle-80 % spread, weight bytes, peak memory of a call, and cosine / SQNR against the float32
model. The ceiling: a bare chain of the model's GEMM shapes through `torch._scaled_mm` (with and without fast
accumulation) / `torch._int_mm` against the same chain in fp16 `torch.mm`: what low precision can give those
shapes on this GPU at most.

Models: ViT-B/16 (torchvision; the quantize step rewrites its `nn.MultiheadAttention` with explicit in_proj /
out_proj Linear modules, `torchopt.quantize.attention`, so its attention projections run in low precision with
its MLP and head) at batch 1 and 64; a BERT-base-sized encoder (12 layers,
768 wide, explicit q/k/v/o Linear layers) at 64x128 and 1x128; ResNet-50 at batch 32 (convolutions have no FP8
kernel in PyTorch: shows where it does not pay). Results: benchmarks/results/bench_lowp.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _results import write_results

import torchopt.quantize as tq
from torchopt.accuracy import compare_outputs
from torchopt.environment import environment
from torchopt.profile.comparison import LatencyComparison, Speedup, compare_latency
from torchopt.quantize.deployment import lowp_unsupported, weight_bytes
from torchopt.quantize.lowp_linear import Fp8Linear

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ("fp8", "int8", "int4_awq")  # the calibrations whose deployed modes are timed
FAST_ACCUM = "fp8 fast-accum"  # the fp8 variant with Hopper's fast accumulation in its GEMMs
LAUNCH_BOUND_US = 20.0  # a bare GEMM below this may take no longer than its launch on the host (~5-10 µs each)
GOALS = {("bert", "64x128", "fp8"): 1.3, ("vit_b_16", "b64", "fp8"): 1.2}  # issue 15's speedups over compiled fp16


class Block(torch.nn.Module):
    """A post-norm BERT layer with explicit q/k/v/o Linear layers (all quantizable) and SDPA attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = self.norm1(x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)))
        return self.norm2(x + self.fc2(F.gelu(self.fc1(x))))


class Encoder(torch.nn.Module):
    def __init__(self, layers: int = 12, dim: int = 768, heads: int = 12):
        super().__init__()
        self.blocks = torch.nn.Sequential(*(Block(dim, heads) for _ in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def _torchvision(name: str) -> torch.nn.Module:
    from torchopt._compat import import_torchvision

    model = getattr(import_torchvision().models, name)(weights=None)
    head = getattr(getattr(model, "heads", None), "head", None)
    if head is not None:  # torchvision zero-initializes ViT's head: every output would be 0 and every variant "exact"
        torch.nn.init.normal_(head.weight, std=0.02)
    return model


def cases(smoke: bool) -> list[dict[str, Any]]:
    """(model, shape label, input shape, calibration shape) for the grid; tiny stand-ins with --smoke."""
    if smoke:
        return [
            {"model": "bert", "shape": "4x16", "build": lambda: Encoder(2, 64, 4), "input": (4, 16, 64)},
            {"model": "bert", "shape": "1x16", "build": lambda: Encoder(2, 64, 4), "input": (1, 16, 64)},
        ]
    bert = [
        {"model": "bert", "shape": s, "build": Encoder, "input": (b, 128, 768)}
        for s, b in (("64x128", 64), ("1x128", 1))
    ]
    vit = [
        {"model": "vit_b_16", "shape": f"b{b}", "build": lambda: _torchvision("vit_b_16"), "input": (b, 3, 224, 224)}
        for b in (64, 1)
    ]
    resnet = [
        {"model": "resnet50", "shape": "b32", "build": lambda: _torchvision("resnet50"), "input": (32, 3, 224, 224)}
    ]
    return bert + vit + resnet


class AsDtype(torch.nn.Module):
    """Calls `module` with its input cast to `dtype` (every variant is timed on the same float32 input)."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.dtype))


def compare(fns: dict[str, Any], x: torch.Tensor, rounds: int, iters: int) -> LatencyComparison:
    """`torchopt.profile.compare_latency`: alternating call-by-call rounds, paired speedups over the first name."""
    return compare_latency(fns, x, rounds=rounds, iters=iters, warmup=3, batch_size=x.shape[0])


def _peak_mb(module: torch.nn.Module, x: torch.Tensor) -> float | None:
    if x.device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(x.device)
    module(x)
    torch.cuda.synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device) / 2**20


def compile_like_torchopt(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile as torchopt's Inductor backend calls it by default: CUDA graphs on CUDA (mode
    "reduce-overhead"; without them a compiled encoder's GPU time hides behind its kernel launches)."""
    return torch.compile(module, mode="reduce-overhead" if device.type == "cuda" else "default")


def quantized(model: torch.nn.Module, x: torch.Tensor, fmt: str, calib_on_cpu: bool) -> torch.nn.Module:
    """The model calibrated for `fmt`; with `calib_on_cpu`, on a CPU copy (no ModelOpt CUDA extension to build: ~70 s
    per format on a fresh GPU machine), the amax values are the same computation."""
    calib = [x + 0.1 * torch.randn_like(x) for _ in range(4)]
    if calib_on_cpu:
        model, calib = copy.deepcopy(model).cpu(), [c.cpu() for c in calib]
    return tq.quantize(copy.deepcopy(model), fmt, calib_data=calib, progress=False)


def variants(
    model: torch.nn.Module, x: torch.Tensor, formats: list[str], calib_on_cpu: bool = False
) -> dict[str, AsDtype | str]:
    """name -> the variant as a module taking float32 input, or why it was not built on this device. With
    `calib_on_cpu` the fake-quant variants are left out (they would need ModelOpt's CUDA extension)."""
    fp16 = copy.deepcopy(model).half()
    out: dict[str, AsDtype | str] = {
        "compiled fp16": AsDtype(compile_like_torchopt(fp16, x.device), torch.float16),  # the baseline of every ratio
        "eager fp16": AsDtype(fp16, torch.float16),
    }
    for fmt in formats:
        qmodel = quantized(model, x, fmt, calib_on_cpu)
        if not calib_on_cpu:
            out[f"fake-quant {fmt}"] = AsDtype(qmodel, torch.float32)  # eager, as the recipes ran it
        for mode in tq.FORMATS[fmt].lowp_modes:
            if calib_on_cpu and mode == "int4_weight_only":
                out[mode] = "skipped: its int4 codes are packed for the device they are built on (calibrate there)"
                continue
            why = lowp_unsupported(mode, x.device)
            if why and x.device.type == "cuda":
                out[mode] = why
                continue
            try:
                deployed = tq.deploy(qmodel, mode).to(x.device)
            except ValueError as exc:  # e.g. no Linear of the model can run it
                out[mode] = str(exc)
                continue
            out[mode] = AsDtype(compile_like_torchopt(deployed, x.device), torch.float16)
            if mode == "fp8":
                out[FAST_ACCUM] = AsDtype(compile_like_torchopt(with_fast_accum(deployed), x.device), torch.float16)
    return out


def with_fast_accum(deployed: torch.nn.Module) -> torch.nn.Module:
    """A copy of a deployed FP8 model whose GEMMs use Hopper's fast accumulation (`Fp8Linear.fast_accum`)."""
    fast = copy.deepcopy(deployed)
    for layer in fast.modules():
        if isinstance(layer, Fp8Linear):
            layer.fast_accum = True
    return fast


def _gemm_rows(case: dict[str, Any]) -> int:
    """Rows of the model's Linear GEMMs per call: tokens for the encoders (ViT-B/16 at 224: 14 x 14 patches + the
    class token), images for ResNet-50 (only its fc)."""
    if case["model"] == "bert":
        return math.prod(case["input"][:-1])
    if case["model"] == "vit_b_16":
        return case["input"][0] * ((case["input"][-1] // 16) ** 2 + 1)
    return case["input"][0]


def _gemm_shapes(model: torch.nn.Module, rows: int) -> list[tuple[int, int, int]]:
    """The float model's Linear GEMMs, with each nn.MultiheadAttention's packed q/k/v projection (a bare
    parameter there, a Linear once the quantize step has rewritten it)."""
    shapes = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            shapes.append((rows, m.in_features, m.out_features))
        elif isinstance(m, torch.nn.MultiheadAttention) and m.in_proj_weight is not None:
            shapes.append((rows, m.embed_dim, 3 * m.embed_dim))
    return shapes


def ceiling(shapes: list[tuple[int, int, int]], device: torch.device, rounds: int) -> dict[str, Any]:
    """The model's Linear GEMM shapes as bare fp16 / FP8 / INT8 GEMM chains: what low precision can give at most."""
    shapes = [s for s in shapes if s[1] % 16 == 0 and s[2] % 16 == 0]
    if not shapes:
        return {"skipped": "no GEMM shape the low-precision kernels take"}
    one = torch.ones((), device=device)
    a16 = [torch.randn(m, k, device=device).half() for m, k, _ in shapes]
    b16 = [torch.randn(n, k, device=device).half() for _, k, n in shapes]
    a8 = [a.to(torch.float8_e4m3fn) for a in a16]
    b8 = [b.to(torch.float8_e4m3fn) for b in b16]
    ai = [torch.randint(-8, 8, (max(m, 17), k), device=device, dtype=torch.int8) for m, k, _ in shapes]
    bi = [torch.randint(-8, 8, (n, k), device=device, dtype=torch.int8) for _, k, n in shapes]
    fns = {
        "fp16 mm": lambda _: [torch.mm(a, b.t()) for a, b in zip(a16, b16, strict=True)],
        "fp8 _scaled_mm": lambda _: [
            torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.float16) for a, b in zip(a8, b8, strict=True)
        ],
        "fp8 _scaled_mm fast-accum": lambda _: [
            torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.float16, use_fast_accum=True)
            for a, b in zip(a8, b8, strict=True)
        ],
        "int8 _int_mm": lambda _: [torch._int_mm(a, b.t()) for a, b in zip(ai, bi, strict=True)],
    }
    cmp = compare_latency(fns, one, rounds=rounds, iters=5, warmup=3)
    return {
        "latency": {n: r.to_dict(samples=False) for n, r in cmp.results.items()},
        "speedup": {n: sp.to_dict() for n, sp in cmp.speedups.items()},
        "gemms": len(shapes),
    }


def run_case(
    case: dict[str, Any], device: torch.device, rounds: int, iters: int, formats: list[str], calib_on_cpu: bool = False
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = case["build"]().eval().to(device)
    x = torch.randn(case["input"], device=device)
    with torch.no_grad():
        reference = model(x)
        built = variants(model, x, formats, calib_on_cpu)
        runnable = {n: v for n, v in built.items() if not isinstance(v, str)}
        cmp = compare(runnable, x, rounds, iters)
        rows: dict[str, Any] = {}
        for name, variant in runnable.items():
            rows[name] = {
                "latency": cmp.results[name].to_dict(samples=False),
                "speedup_vs_compiled_fp16": cmp.speedups[name].to_dict() if name in cmp.speedups else None,
                "weight_bytes": weight_bytes(getattr(variant.module, "_orig_mod", variant.module)),
                "peak_mb": _peak_mb(variant, x),
                "accuracy": compare_outputs(reference, variant(x).float(), task="embed").to_dict(),
            }
        rows.update({name: {"skipped": why} for name, why in built.items() if isinstance(why, str)})
        gemm_rows = _gemm_rows(case)
        return {
            "model": case["model"],
            "shape": case["shape"],
            "input": list(case["input"]),
            "variants": rows,
            "ceiling": ceiling(_gemm_shapes(model, gemm_rows), device, rounds) if device.type == "cuda" else None,
        }


def _fmt_speedup(s: dict[str, Any]) -> str:
    return str(Speedup.from_dict(s))


def goals(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for (model, shape, mode), need in GOALS.items():
        row = next((r for r in results if r["model"] == model and r["shape"] == shape), None)
        got = row and row["variants"].get(mode, {}).get("speedup_vs_compiled_fp16")
        if not got:
            lines.append(f"- {model} {shape} {mode} >= {need}x: not measured in this run")
            continue
        verdict = "met" if got["low"] >= need else "NOT met"
        lines.append(f"- {model} {shape} {mode} >= {need}x over compiled fp16: {verdict} ({_fmt_speedup(got)})")
    return lines


def model_ceiling(result: dict[str, Any]) -> list[str]:
    """Amdahl's bound for the whole model, from this run's medians: compiled fp16 with its Linear GEMM time swapped
    for the bare low-precision chain's. The rest (attention, norms, activations) stays as fast as it is in fp16."""
    base = result["variants"].get("compiled fp16", {}).get("latency")
    lat = result["ceiling"]["latency"]
    if not base or "fp16 mm" not in lat:
        return []
    gemm16, rest = lat["fp16 mm"]["p50_ms"], base["p50_ms"] - lat["fp16 mm"]["p50_ms"]
    if rest <= 0:
        return [
            "",
            f"No whole-model bound: the bare fp16 chain ({gemm16:.3f} ms, kernels launched one by one) takes longer"
            f" than the whole compiled model ({base['p50_ms']:.3f} ms, one CUDA graph), so at this size the chains"
            " time launches, not GEMMs.",
        ]
    chains = {"fp8": "fp8 _scaled_mm", FAST_ACCUM: "fp8 _scaled_mm fast-accum", "int8": "int8 _int_mm"}
    bounds = [
        f"{variant} {base['p50_ms'] / (rest + lat[chain]['p50_ms']):.2f}x"
        for variant, chain in chains.items()
        if chain in lat
    ]
    per_gemm_us = 1e3 * gemm16 / result["ceiling"]["gemms"]
    launch_note = (
        f" At {per_gemm_us:.0f} µs per bare fp16 GEMM, launches may set the chains' times: read this bound as rough."
        if per_gemm_us < LAUNCH_BOUND_US
        else ""
    )
    return [
        "",
        f"Whole-model bound (an estimate from the medians above, not a measurement): compiled fp16 spends about"
        f" {gemm16:.3f} of its {base['p50_ms']:.3f} ms in these GEMMs; with them at the bare low-precision time and"
        f" the rest unchanged, the most a deployed model can gain is {', '.join(bounds)}.{launch_note}",
    ]


def markdown(results: list[dict[str, Any]], env: dict[str, Any], smoke: bool) -> str:
    head = ["# bench_lowp: real FP8 / INT8 without TensorRT", ""]
    if smoke:
        head += ["**SMOKE RUN**: tiny shapes, for checking the script; these figures are not a benchmark.", ""]
    head += [f"{env.get('gpu') or env.get('cpu')}, torch {env.get('torch')}, {env.get('date')}", ""]
    lines = [*head, "## Goals", *goals(results), ""]
    for r in results:
        lines += [f"## {r['model']} {r['shape']} (input {r['input']})", ""]
        lines += ["| variant | p50 ms | p99 ms | items/s | vs compiled fp16 | weight MB | peak MB | cosine | SQNR dB |"]
        lines += ["|---|---|---|---|---|---|---|---|---|"]
        for name, v in r["variants"].items():
            if "skipped" in v:
                lines.append(f"| {name} | skipped: {v['skipped']} |||||||| ")
                continue
            peak = "-" if v["peak_mb"] is None else f"{v['peak_mb']:.0f}"
            lat, sp = v["latency"], v["speedup_vs_compiled_fp16"]
            lines.append(
                f"| {name} | {lat['p50_ms']:.3f} | {lat['p99_ms']:.3f} | {lat['throughput']:.0f} |"
                f" {_fmt_speedup(sp) if sp else 'baseline'} | {v['weight_bytes'] / 2**20:.1f} | {peak} |"
                f" {v['accuracy']['cosine']:.5f} | {v['accuracy']['sqnr_db']:.1f} |"
            )
        if r["ceiling"] and "latency" in r["ceiling"]:
            c = r["ceiling"]
            sp = {n: _fmt_speedup(x) for n, x in c["speedup"].items()}
            figures = [f"{n} {lat['p50_ms']:.3f} ms ({sp.get(n, 'baseline')})" for n, lat in c["latency"].items()]
            lines += [
                "",
                "Ceiling (the model's Linear GEMM shapes as bare kernels, launched one by one): " + ", ".join(figures),
            ]
            lines += model_ceiling(r)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, measures nothing")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=None, help="only these models (bert, vit_b_16, resnet50)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--shapes", nargs="+", default=None, help="only these shape labels (e.g. 64x128 b64)")
    parser.add_argument(
        "--calib-on-cpu",
        action="store_true",
        help="calibrate on the CPU and leave out fake-quant (no ModelOpt CUDA build)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.smoke:
        print(
            "bench_lowp measures GPU kernels: run it on a CUDA GPU, or with --smoke to check the script",
            file=sys.stderr,
        )
        return 2
    env = environment(device)
    results = []
    for case in cases(args.smoke):
        if (args.models and case["model"] not in args.models) or (args.shapes and case["shape"] not in args.shapes):
            continue
        print(f"[bench_lowp] {case['model']} {case['shape']}", file=sys.stderr, flush=True)
        torch._dynamo.reset()
        rounds, iters = (3, 2) if args.smoke else (args.rounds, args.iters)
        results.append(run_case(case, device, rounds, iters, args.formats, args.calib_on_cpu))
        # Written after every case, so a run cut short by a time limit keeps what it measured.
        data = {"environment": env, "smoke": args.smoke, "formats": args.formats, "results": results}
        name = "bench_lowp_smoke" if args.smoke else "bench_lowp"
        write_results(data, markdown(results, env, args.smoke), args.out, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
