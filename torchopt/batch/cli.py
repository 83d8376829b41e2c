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
import sys
from pathlib import Path
from typing import Any

import torch

from torchopt.batch import MaxBatchConfig, OptimalBatchConfig, batch_profile, find_max_batch, find_optimal_batch
from torchopt.batch._calls import as_make_inputs
from torchopt.cli_args import add_config_arguments, add_model_arguments, check_out_dir, format_bytes, parse_bytes
from torchopt.config import DTYPES, resolve_device
from torchopt.inputs import parse_input_spec
from torchopt.models import load_model

__all__ = ["register", "run_find_batch"]


_BYTE_OPTIONS = ("memory_budget", "headroom")
_SHOW_BYTES = dict.fromkeys(_BYTE_OPTIONS, format_bytes)


def register(subparsers: Any) -> None:
    """Add the `find-batch` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "find-batch",
        help="largest batch that fits in memory, and the fastest batch within a latency budget",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

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
    # Sizes in bytes are parsed in run_find_batch, where a bad one is a one-line error like any other.
    add_config_arguments(
        p, MaxBatchConfig, ["memory_budget", "headroom"], parsers=dict.fromkeys(_BYTE_OPTIONS, str), shows=_SHOW_BYTES
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="never run a larger batch, in either search (default: the top of the --input batch range, if any)",
    )
    add_config_arguments(p, OptimalBatchConfig, ["latency_budget_ms", "percentile"])
    add_config_arguments(p, MaxBatchConfig, ["progress"])
    p.add_argument("--out", default="torchopt_out/find_batch", help="output directory")
    p.set_defaults(func=run_find_batch)


def _spec_text(spec) -> str:
    dims = [str(lo) if lo == hi else f"{lo}-{op}-{hi}" for lo, op, hi in zip(spec.min, spec.opt, spec.max, strict=True)]
    dtype = "" if spec.dtype == "float32" else f":{spec.dtype}"
    return f"{spec.name}{dtype}={'x'.join(dims)}"


def _given_batch_range(specs) -> tuple[int | None, int | None]:
    """(min, max) of dim 0 over the inputs when any of them gives a dynamic batch range, else (None, None)."""
    dynamic = [s for s in specs if s.min[0] != s.max[0]]
    if not dynamic:
        return None, None
    return max(s.min[0] for s in dynamic), min(s.max[0] for s in dynamic)


def _profile_label(mx, best, max_fit: int, max_batch: int | None, given_hi: int | None) -> str:
    """What each number of the printed profile is, and where it came from."""
    if best is not None:
        sizes = [p.size for p in best.points if p.status == "ok"]
        opt = f"opt = optimal of the sizes swept ({min(sizes)}..{max(sizes)})"
    else:
        opt = "opt kept from --input"
    if mx is not None and mx.limited_by == "max_batch":
        source = "--max-batch" if max_batch is not None else "--input"
        top = f"max = {max_fit}, the {source} cap (fits in memory: memory search)"
    elif mx is not None:
        top = f"max = max fit (memory search, {mx.limited_by}-limited)"
    elif max_batch is not None:
        top = f"max = {max_fit} from --max-batch (no memory search ran)"
    elif given_hi is not None and max_fit == given_hi:
        top = f"max = {max_fit} kept from --input (no memory search ran)"
    else:
        top = f"max = {max_fit}, the largest size swept that ran (no memory search ran)"
    return f"{opt}, {top}"


def run_find_batch(args: argparse.Namespace) -> int:
    """`torchopt find-batch`: see the module docstring."""
    specs = [parse_input_spec(t) for t in args.input]
    budget = parse_bytes(args.memory_budget, "--memory-budget") if args.memory_budget is not None else None
    headroom = parse_bytes(args.headroom, "--headroom")
    device = resolve_device("--device", args.device)
    out = Path(args.out)
    check_out_dir(out)  # now, before the searches; the folder itself is made when the first result is written
    dtype = DTYPES[args.dtype]
    model = load_model(args.model).to(device=device, dtype=dtype)
    run_max = args.mode in ("max", "both") or (args.mode == "auto" and (device.type == "cuda" or budget))
    run_opt = args.mode in ("optimal", "both", "auto")
    report: dict[str, Any] = {"model": args.model, "inputs": args.input, "device": str(device), "dtype": args.dtype}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)

    # The searches stay inside the batch range the inputs give (dim 0 min..max when it is dynamic);
    # --max-batch overrides the top. A static batch dim gives no range: the searches go as far as they can.
    given_lo, given_hi = _given_batch_range(specs)
    cap = args.max_batch if args.max_batch is not None else given_hi
    max_fit = cap
    best = mx = None
    if run_max:
        print(f"searching the largest batch of {args.model} that fits on {device} ...", file=sys.stderr)
        make = as_make_inputs(specs, model, "find-batch", which="max", float_dtype=dtype)
        limits = {} if cap is None else {"max_batch": cap}  # else MaxBatchConfig's own limit
        mx = find_max_batch(model, make, memory_budget=budget, headroom=headroom, progress=args.progress, **limits)
        print(mx)
        out.mkdir(parents=True, exist_ok=True)
        mx.plot().savefig(out / "max_batch.png", dpi=120)
        report["max_batch"] = mx.to_dict()
        max_fit = mx.size
    elif args.mode == "auto":
        print("memory search skipped: it runs on CUDA, or on CPU with --memory-budget", file=sys.stderr)
    if run_opt:
        print(f"sweeping batch sizes of {args.model} for throughput ...", file=sys.stderr)
        make = as_make_inputs(specs, model, "find-batch", which="opt", float_dtype=dtype)
        start = min(given_lo or 1, max_fit or given_lo or 1)
        best = find_optimal_batch(
            model,
            make,
            latency_budget_ms=args.latency_budget_ms,
            percentile=args.percentile,
            max_batch=max_fit,
            start=start,
            progress=args.progress,
        )
        print(best)
        out.mkdir(parents=True, exist_ok=True)
        best.plot().savefig(out / "optimal_batch.png", dpi=120)
        report["optimal_batch"] = best.to_dict()
        if max_fit is None:  # no memory search and no cap: the largest size swept that ran
            max_fit = max(p.size for p in best.points if p.status == "ok")
    if max_fit is not None:
        profile = batch_profile(specs, max_fit, best)
        report["profile"] = [s.to_dict() for s in profile]
        what = _profile_label(mx, best, max_fit, args.max_batch, given_hi)
        report["profile_label"] = what
        print(f"profile ({what}): " + " ".join(f"--input {_spec_text(s)}" for s in profile))
    out.mkdir(parents=True, exist_ok=True)
    (out / "find_batch.json").write_text(json.dumps(report, indent=2))
    print(f"results: {out / 'find_batch.json'}; figures in {out}")
    return 0
