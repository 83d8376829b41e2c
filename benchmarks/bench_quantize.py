"""torchopt.quantize on a GPU: calibration wall time per method and fake-quant accuracy per format and method,
for ResNet-50 and a BERT-base-sized transformer encoder, plus the torch.export check the TensorRT backend needs.

    python benchmarks/bench_quantize.py    # <= ~4.5 minutes on an H100 (--time-budget 240); writes benchmarks/results/
    python benchmarks/bench_quantize.py --models resnet50 --batches 8

What is measured, side by side in one run, per model (random weights, seeded):

- every (format, method) pair `torchopt.quantize.compare` accepts: the wall time of `quantize` on 32
  calibration batches (ModelOpt conversion + calibration forwards + amax computation, CUDA synchronized),
  and the agreement of the fake-quant model with the float model on held-out batches (SQNR, cosine, top-1
  agreement of the argmax), with how many layers ended up quantized / bypassed;
- the cost of ModelOpt's entropy (KL-divergence) search per activation quantizer at stride 1 (its default)
  and at the stride the grid uses, on a histogram collected from the model;
- GPU verification for TensorRT: `torch.export` of the INT8 and FP8 models under ModelOpt's
  ``export_torch_mode()`` (`torchopt.quantize.export_quantized`), whether the graph holds ModelOpt's
  ``tensorrt::quantize_op`` nodes, and the exported program's output against the fake-quant model.

Not measured: TensorRT engine latency. TensorRT is not installed on the lent GPU machine; these fake-quant
models simulate the Q/DQ arithmetic in PyTorch and are slower than float, so their latency says nothing
about deployment speed. The results say so.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import torchopt.quantize as tq
from torchopt._compat import import_modelopt_quantization
from torchopt.environment import environment
from torchopt.quantize.calibrate import CalibData
from torchopt.quantize.evaluate import EvalSet

RESULTS = Path(__file__).resolve().parent / "results"
N_CALIB = 32  # calibration batches (the issue's "32 batches")
N_EVAL = 4  # held-out evaluation batches
BATCH = 16
# ModelOpt's KL search is Python over histogram bins (~2048/stride evaluations per activation quantizer, on the
# CPU); stride 4 keeps this run in budget. Its stride-1 cost is measured separately below.
ENTROPY_STRIDE = 4
GRID = {
    "resnet50": {
        "int8": ["max", "entropy", "percentile", "mse"],
        "fp8": ["max", "percentile", "mse"],
        "nvfp4": ["max"],
    },
    "transformer": {
        "int8": ["max", "entropy", "percentile", "mse"],
        "int8_smoothquant": ["smoothquant"],
        "fp8": ["max", "percentile", "mse"],
        "int4_awq": ["awq"],
        "nvfp4": ["max"],
    },
}


# ---------------------------------------------------------------------------------------------------------
# Models and data


def build(
    name: str, device: torch.device, n_calib: int = N_CALIB, batch: int = BATCH
) -> tuple[torch.nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    """(float model, calibration batches, evaluation batches); random weights and inputs, seeded."""
    torch.manual_seed(0)
    if name == "resnet50":
        from torchopt._compat import import_torchvision

        model = import_torchvision().models.resnet50(weights=None)
        shape = (batch, 3, 224, 224)
    elif name == "transformer":
        # BERT-base sized: 12 layers, d_model 768, 12 heads, FFN 3072, sequence 128.
        layer = torch.nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, activation="gelu", batch_first=True)
        model = torch.nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
        shape = (batch, 128, 768)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {list(GRID)}")
    model = model.eval().to(device)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randn(shape, generator=gen).to(device) for _ in range(n_calib)]
    evals = [torch.randn(shape, generator=gen).to(device) for _ in range(N_EVAL)]
    return model, calib, evals


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finite(value: Any) -> Any:
    """JSON has no infinity: identical outputs (SQNR = inf) are written as the string 'inf'."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------
# Measurements


def warm_up_modelopt(device: torch.device) -> dict[str, Any]:
    """Import ModelOpt and load its CUDA fake-quant extensions once, outside the timed runs."""
    t0 = time.perf_counter()
    tiny = torch.nn.Sequential(torch.nn.Linear(32, 32)).to(device)
    notes = []
    for fmt in ("int8", "fp8"):
        q = tq.quantize(copy.deepcopy(tiny), fmt, [torch.randn(4, 32, device=device)], progress=False)
        notes += q.torchopt_quant.notes
    return {"seconds": time.perf_counter() - t0, "notes": notes}


def run_grid(
    name: str, device: torch.device, formats: list[str], n_calib: int, batch: int, deadline: float
) -> dict[str, Any]:
    model, calib_batches, eval_batches = build(name, device, n_calib, batch)
    calib = CalibData(calib_batches)
    evals = EvalSet(model, eval_batches)
    rows = []
    for fmt, methods in GRID[name].items():
        if fmt not in formats:
            continue
        for method in methods:
            row: dict[str, Any] = {"model": name, "format": fmt, "method": method}
            if tq.FORMATS[fmt].needs_cuda and device.type != "cuda":
                rows.append({**row, "status": "skipped", "note": f"{fmt} needs CUDA"})
                continue
            if time.perf_counter() > deadline:  # keep the results of the rows that ran
                rows.append({**row, "status": "skipped", "note": "time budget reached (--time-budget)"})
                continue
            options = {"entropy_stride": ENTROPY_STRIDE} if method == "entropy" else {}
            work = copy.deepcopy(model)
            try:
                _sync(device)
                t0 = time.perf_counter()
                q = tq.quantize(work, fmt, calib, method=method, progress=False, **options)
                _sync(device)
                seconds = time.perf_counter() - t0
                counts = tq.summary(q).counts()
                metrics = evals.metrics(q)
                rows.append(
                    {
                        **row,
                        "status": "ok",
                        "calib_seconds": seconds,
                        **metrics,
                        "layers": counts,
                        "notes": q.torchopt_quant.notes,
                        **options,
                    }
                )
                print(
                    f"  {name:12s} {fmt:17s} {method:11s} {seconds:7.2f} s  SQNR {metrics['sqnr_db']:6.2f} dB"
                    f"  cos {metrics['cosine']:.5f}  top1 {metrics['top1_agreement']}  layers {counts}",
                    flush=True,
                )
            except Exception as exc:  # one failing format must not lose the others' results
                rows.append({**row, "status": "error", "note": f"{type(exc).__name__}: {exc}"[:400]})
                print(f"  {name} {fmt}/{method} FAILED: {type(exc).__name__}: {exc}", flush=True)
                traceback.print_exc()
            del work
            if device.type == "cuda":
                torch.cuda.empty_cache()
    kl = entropy_cost(model, calib_batches[:4])
    return {"rows": rows, "entropy_search": kl}


def entropy_cost(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Seconds of ModelOpt's KL search for one activation quantizer (the last layer's input histogram)."""
    mtq = import_modelopt_quantization()
    hist = mtq.calib.HistogramCalibrator(8, None, False)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    handle = last.register_forward_pre_hook(lambda _m, args: hist.collect(args[0].detach()))
    with torch.no_grad():
        for x in batches:
            model(x)
    handle.remove()
    out = {}
    for stride in sorted({1, ENTROPY_STRIDE}):
        t0 = time.perf_counter()
        amax = hist.compute_amax("entropy", stride=stride)
        out[f"stride_{stride}"] = {"seconds": time.perf_counter() - t0, "amax": float(amax)}
    return out


def export_check(name: str, device: torch.device, batch: int, deadline: float) -> list[dict[str, Any]]:
    """torch.export of INT8 and FP8 models under export_torch_mode (CUDA only): quantize ops present?"""
    if device.type != "cuda":
        return [{"model": name, "status": "skipped", "note": "torch.export of Q/DQ models needs CUDA"}]
    if time.perf_counter() > deadline:
        return [{"model": name, "status": "skipped", "note": "time budget reached (--time-budget)"}]
    model, calib_batches, eval_batches = build(name, device, 4, batch)
    out = []
    for fmt in ("int8", "fp8"):
        row: dict[str, Any] = {"model": name, "format": fmt}
        try:
            q = tq.quantize(copy.deepcopy(model), fmt, calib_batches, progress=False)
            x = eval_batches[0][:2]
            t0 = time.perf_counter()
            program = tq.export_quantized(q, (x,))
            seconds = time.perf_counter() - t0
            ops = tq.quant_ops(program)
            with torch.no_grad():
                diff = float((program.module()(x) - q(x)).abs().max())
            row.update(
                status="ok",
                export_seconds=seconds,
                quant_ops=ops,
                has_quantize_ops=bool(ops),
                max_abs_diff_vs_fake_quant=diff,
            )
            print(
                f"  export {name} {fmt}: {seconds:.1f} s, tensorrt quantize ops: {ops or 'NONE'}, "
                f"max |exported - fake-quant| {diff:.3g}",
                flush=True,
            )
        except Exception as exc:
            row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:400])
            print(f"  export {name} {fmt} FAILED: {type(exc).__name__}: {exc}", flush=True)
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------------
# Report


def _v(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        "# torchopt.quantize benchmark",
        "",
        f"{env.get('gpu') or 'CPU'} (capability {env.get('gpu_capability', '–')}), torch {env['torch']},"
        f" ModelOpt {result['modelopt']}, {env['date']}.",
        "",
        f"Calibration: {result['settings']['calib_batches']} batches of {result['settings']['batch']} (random"
        f" inputs, random-weight models); evaluation: {N_EVAL} held-out batches against the float model. Entropy"
        f" uses stride {ENTROPY_STRIDE}.",
        "",
        f"**TensorRT latency is not measured**: {result['tensorrt_note']}",
        "",
        "| model | format | method | quantize (s) | SQNR (dB) | cosine | top-1 agreement | layers | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        layers = ", ".join(f"{k} {v}" for k, v in (r.get("layers") or {}).items())
        lines.append(
            f"| {r['model']} | {r['format']} | {r['method']} | {_v(r.get('calib_seconds'), '.2f')} |"
            f" {_v(r.get('sqnr_db'), '.2f')} | {_v(r.get('cosine'), '.5f')} | {_v(r.get('top1_agreement'), '.3f')} |"
            f" {layers or '–'} | {r['status']}{': ' + r['note'] if r.get('note') else ''} |"
        )
    lines += ["", "## Entropy (KL) search per activation quantizer", ""]
    for model, kl in result["entropy_search"].items():
        parts = [f"stride {k.split('_')[1]}: {v['seconds']:.2f} s (amax {v['amax']:.4g})" for k, v in kl.items()]
        lines.append(f"- {model}: " + "; ".join(parts))
    lines += ["", "## torch.export under export_torch_mode (what Torch-TensorRT consumes)", ""]
    for r in result["export"]:
        if r["status"] == "ok":
            lines.append(
                f"- {r['model']} {r['format']}: exported in {r['export_seconds']:.1f} s; tensorrt quantize ops"
                f" {r['quant_ops'] or 'NONE'}; max |exported − fake-quant| {r['max_abs_diff_vs_fake_quant']:.3g}"
            )
        else:
            lines.append(f"- {r['model']} {r.get('format', '')}: {r['status']} — {r.get('note', '')}")
    if result["warm_up"]["notes"]:
        lines += ["", "Notes: " + "; ".join(result["warm_up"]["notes"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(GRID), choices=list(GRID))
    parser.add_argument("--formats", nargs="+", default=list(tq.FORMATS), choices=list(tq.FORMATS))
    parser.add_argument("--batches", type=int, default=N_CALIB, help=f"calibration batches (default {N_CALIB})")
    parser.add_argument("--batch-size", type=int, default=BATCH, help=f"samples per batch (default {BATCH})")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results directory (default: {RESULTS})")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=240.0,
        help="seconds after which the remaining rows are skipped, so that results are written inside"
        " run_all.sh's 300 s limit (default 240; the export checks get the last part)",
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        print("warning: no CUDA device; running on CPU (NVFP4 and the export check are skipped)", file=sys.stderr)
    result: dict[str, Any] = {
        "environment": environment(),
        "modelopt": importlib.metadata.version("nvidia-modelopt"),
        "settings": {
            "calib_batches": args.batches,
            "eval_batches": N_EVAL,
            "batch": args.batch_size,
            "entropy_stride": ENTROPY_STRIDE,
        },
        "tensorrt_note": (
            "TensorRT is not installed on the benchmark machine, so no engine is built or timed; the rows are"
            " ModelOpt fake-quant (simulated Q/DQ in PyTorch), whose speed says nothing about TensorRT's."
        ),
        "rows": [],
        "entropy_search": {},
        "export": [],
    }
    t_start = time.perf_counter()
    # The grid of each model may use its share of 75 % of the budget; the export checks the rest.
    share = 0.75 * args.time_budget / len(args.models)
    result["warm_up"] = warm_up_modelopt(device)
    for i, name in enumerate(args.models):
        print(f"== {name}", flush=True)
        grid = run_grid(name, device, args.formats, args.batches, args.batch_size, t_start + share * (i + 1))
        result["rows"] += grid["rows"]
        result["entropy_search"][name] = grid["entropy_search"]
    for name in args.models:
        result["export"] += export_check(name, device, args.batch_size, t_start + args.time_budget)
    result["total_seconds"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "bench_quantize"
    stem.with_suffix(".json").write_text(json.dumps(_finite(result), indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {stem}.json and {stem}.md in {result['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
