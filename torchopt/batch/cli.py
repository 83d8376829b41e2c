"""`torchopt find-batch`: the largest batch that fits and the fastest batch within a latency budget.

    torchopt find-batch resnet50 --input x=1-8-32x3x224x224 --dtype float16 --latency-budget-ms 20
    torchopt find-batch my_pkg.models:build --input x=1x128 --mode optimal --max-batch 512 --device cpu

The memory search (`--mode max`) runs on CUDA, or on CPU with `--memory-budget` (peak RSS); `--mode auto`
runs it when it can and always runs the latency sweep (up to the max fit, or `--max-batch`). Writes
``find_batch.json``, ``max_batch.png`` and ``optimal_batch.png`` to `--out`, and prints the resulting input
profile (opt = optimal, max = max fit) in the `--input` syntax of `torchopt optimize`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["parse_bytes", "register", "run_find_batch"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str, name: str = "size") -> int:
    """``"16GiB"``, ``"512MiB"``, ``"2.5GB"`` or a number of bytes → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{name} must be a number of bytes or a size like 16GiB, 512MiB, 2.5GB; got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def register(subparsers: Any) -> None:
    """Add the `find-batch` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "find-batch",
        help="largest batch that fits in memory, and the fastest batch within a latency budget",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from torchopt.cli import add_model_arguments  # noqa: PLC0415  (torchopt.cli imports this module)

    add_model_arguments(
        p,
        "input spec name[:dtype]=DIMxDIM... (dim 0 is the batch; other dims: max for memory, opt for"
        " latency); repeat per input",
    )
    p.add_argument(
        "--mode",
        choices=["auto", "max", "optimal", "both"],
        default="auto",
        help="max: memory search; optimal: latency sweep; both; auto: both where the memory search"
        " can run (CUDA, or --memory-budget on CPU), else the sweep (default: auto)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="cast the model and floating inputs (default: float32)",
    )
    p.add_argument("--memory-budget", default=None, help="peak memory allowed, e.g. 20GiB (default: all free)")
    p.add_argument("--headroom", default=None, help="bytes kept free below the budget (default: 256MiB)")
    p.add_argument("--max-batch", type=int, default=None, help="never run a larger batch")
    p.add_argument("--latency-budget-ms", type=float, default=None, help="latency budget per call (ms)")
    p.add_argument("--percentile", type=float, default=None, help="percentile held to the budget (default 99)")
    p.add_argument("--out", default="torchopt_out/find_batch", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_find_batch)


def _spec_text(spec) -> str:
    dims = [str(lo) if lo == hi else f"{lo}-{op}-{hi}" for lo, op, hi in zip(spec.min, spec.opt, spec.max, strict=True)]
    dtype = "" if spec.dtype == "float32" else f":{spec.dtype}"
    return f"{spec.name}{dtype}={'x'.join(dims)}"


def run_find_batch(args: argparse.Namespace) -> int:
    """`torchopt find-batch`: see the module docstring."""
    import torch

    from torchopt.batch import batch_profile, find_max_batch, find_optimal_batch
    from torchopt.batch._step import as_make_inputs
    from torchopt.inputs import DTYPES, parse_input_spec
    from torchopt.models import load_model

    specs = [parse_input_spec(t) for t in args.input]
    budget = parse_bytes(args.memory_budget, "--memory-budget") if args.memory_budget is not None else None
    headroom = parse_bytes(args.headroom, "--headroom") if args.headroom is not None else None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r} needs CUDA, but no CUDA device is available here")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {args.out!r} cannot be created: {exc}") from None
    dtype = DTYPES[args.dtype]
    model = load_model(args.model).to(device=device, dtype=dtype)
    progress = not args.no_progress
    run_max = args.mode in ("max", "both") or (args.mode == "auto" and (device.type == "cuda" or budget))
    run_opt = args.mode in ("optimal", "both", "auto")
    report: dict[str, Any] = {"model": args.model, "inputs": args.input, "device": str(device), "dtype": args.dtype}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)

    max_fit = args.max_batch
    best = None
    if run_max:
        print(f"searching the largest batch of {args.model} that fits on {device} ...", file=sys.stderr)
        make = as_make_inputs(specs, model, "find-batch", which="max", float_dtype=dtype)
        mx = find_max_batch(
            model, make, memory_budget=budget, headroom=headroom, max_batch=args.max_batch, progress=progress
        )
        print(mx)
        mx.plot().savefig(out / "max_batch.png", dpi=120)
        report["max_batch"] = mx.to_dict()
        max_fit = mx.size
    elif args.mode == "auto":
        print("memory search skipped: it runs on CUDA, or on CPU with --memory-budget", file=sys.stderr)
    if run_opt:
        print(f"sweeping batch sizes of {args.model} for throughput ...", file=sys.stderr)
        make = as_make_inputs(specs, model, "find-batch", which="opt", float_dtype=dtype)
        best = find_optimal_batch(
            model,
            make,
            latency_budget_ms=args.latency_budget_ms,
            percentile=args.percentile,
            max_batch=max_fit,
            progress=progress,
        )
        print(best)
        best.plot().savefig(out / "optimal_batch.png", dpi=120)
        report["optimal_batch"] = best.to_dict()
        if max_fit is None:  # no memory search and no cap: the largest size swept that ran
            max_fit = max(p.size for p in best.points if p.status == "ok")
    if max_fit is not None:
        profile = batch_profile(specs, max_fit, best)
        report["profile"] = [s.to_dict() for s in profile]
        what = "opt = optimal, max = max fit" if run_opt else "max = max fit, opt kept"
        print(f"profile ({what}): " + " ".join(f"--input {_spec_text(s)}" for s in profile))
    (out / "find_batch.json").write_text(json.dumps(report, indent=2))
    print(f"results: {out / 'find_batch.json'}; figures in {out}")
    return 0
