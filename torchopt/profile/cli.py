"""`torchopt bench` and `torchopt profile`: latency statistics, or a full profile, of a model from the shell.

    torchopt bench resnet50 --input x=8x3x224x224 --out out/bench [--compile] [--cuda-graph] [--l2 cold]
    torchopt profile my_pkg.models:build --input x=1x3x224x224 --out out/profile [--memory-history]

`bench` writes ``latency.png`` (+ ``comparison.png`` with ``--compile``) and ``bench.json`` / ``bench.md``;
`profile` writes ``trace.json.gz`` (open in https://ui.perfetto.dev), ``latency.png``, ``stages.png``,
``memory.png`` (+ ``alloc_history.pickle`` for https://pytorch.org/memory_viz on CUDA) and
``profile.json`` / ``profile.md``. Each top-level child module of the model is a stage.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

import torch

from torchopt.cli_args import add_model_arguments
from torchopt.config import check_positive, resolve_device
from torchopt.inputs import parse_input_spec
from torchopt.models import load_model
from torchopt.profile import (
    compare_latency,
    latency,
    memory,
    plot_comparison,
    plot_latency,
    plot_memory,
    plot_stage_timeline,
    stage_modules,
    trace,
)
from torchopt.profile.files import check_output_dir
from torchopt.profile.profile_report import ProfileReport
from torchopt.profile.timing import latency_markdown

__all__ = ["register"]


def _add_common(p: argparse.ArgumentParser, out: str) -> None:

    add_model_arguments(p, "input spec name[:dtype]=DIMxDIM..., DIM = N or MIN-OPT-MAX (opt is used); repeat per input")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--out", default=out, help=f"output directory (default: {out})")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing (default: 10)")
    p.add_argument("--iters", type=int, default=100, help="timed calls, at least (default: 100)")
    p.add_argument("--batch-size", type=int, default=None, help="items per call (default: dim 0 of the first input)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers: Any) -> None:
    """Add the `bench` and `profile` subcommands to an argparse subparsers object."""
    bench = subparsers.add_parser(
        "bench",
        help="latency statistics of a model (p50/p99, throughput, stability) with figures and a report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(bench, "torchopt_out/bench")
    bench.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (CUDA only)")
    bench.add_argument("--l2", choices=["hot", "cold"], default="hot", help="cold: flush the cache before each call")
    bench.add_argument("--compile", action="store_true", help="also time torch.compile(model) and compare")
    bench.set_defaults(func=run_bench)

    prof = subparsers.add_parser(
        "profile",
        help="trace (torch.profiler), per-stage time and memory, latency, figures and a report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(prof, "torchopt_out/profile")
    prof.add_argument("--wait", type=int, default=1, help="profiler schedule: steps skipped (default: 1)")
    prof.add_argument("--trace-warmup", type=int, default=1, help="profiler schedule: warm-up steps (default: 1)")
    prof.add_argument("--active", type=int, default=3, help="profiler schedule: recorded steps (default: 3)")
    prof.add_argument("--with-stack", action="store_true", help="record Python stacks (larger trace)")
    prof.add_argument("--record-shapes", action="store_true", help="record op input shapes (larger trace)")
    prof.add_argument("--max-trace-mb", type=float, default=100.0, help="bound on the trace's JSON size (MB)")
    prof.add_argument("--memory-history", action="store_true", help="CUDA: dump an allocation history pickle")
    prof.set_defaults(func=run_profile)


def _setup(args: argparse.Namespace) -> tuple[Any, list[Any], Any, Path, int]:
    """Model (eval, on the device), seeded example inputs, the device, the output dir, the batch size."""
    check_positive("--warmup", args.warmup)
    check_positive("--iters", args.iters)
    if args.batch_size is not None:
        check_positive("--batch-size", args.batch_size)
    out = check_output_dir(args.out, "--out")
    specs = [parse_input_spec(t) for t in args.input]
    device = resolve_device("--device", args.device)
    model = load_model(args.model).to(device)
    inputs = [s.example("opt", device=device, seed=i) for i, s in enumerate(specs)]
    batch = args.batch_size or (inputs[0].shape[0] if inputs[0].dim() > 0 else 1)
    print(f"{args.model} on {device}: inputs {[tuple(x.shape) for x in inputs]}, batch {batch}", file=sys.stderr)
    return model, inputs, device, out, int(batch)


def _print_outputs(json_path: Path, md_path: Path, figures: dict[str, str], extra: list[str] = ()) -> None:
    print(f"report: {md_path}, {json_path}")
    for name, path in figures.items():
        print(f"figure {name}: {path}")
    for line in extra:
        print(line)


def run_bench(args: argparse.Namespace) -> int:
    """`torchopt bench`: latency of the model (and of torch.compile(model) with --compile)."""
    model, inputs, _, out, batch = _setup(args)
    opts = {
        "warmup": args.warmup,
        "iters": args.iters,
        "batch_size": batch,
        "cuda_graph": args.cuda_graph,
        "l2": args.l2,
        "progress": not args.no_progress,
    }
    if args.compile and (args.cuda_graph or args.l2 == "cold"):
        raise ValueError("--compile times eager and compiled in alternating rounds, without --cuda-graph or --l2 cold")
    results, speedups = {}, None
    with torch.inference_mode():
        if not args.compile:
            print("timing eager ...", file=sys.stderr)
            results["eager"] = latency(model, *inputs, **opts)
        else:
            # eager and compiled called in turn, in the same rounds: a speedup with its spread, not two
            # measurements taken at different moments (compile workers and other load change in between)
            print("compiling and timing eager vs compiled in alternating rounds ...", file=sys.stderr)
            cmp = compare_latency(
                {"eager": model, "compiled": torch.compile(model)},
                *inputs,
                rounds=10,
                iters=max(1, args.iters // 10),
                warmup=args.warmup,
                batch_size=batch,
            )
            results, speedups = cmp.results, cmp.speedups
    plot_latency(results["eager"], out / "latency.png", title=f"{args.model} latency")
    figures = {"latency": str(out / "latency.png")}
    if len(results) > 1:
        plot_comparison(results, out / "comparison.png", title=args.model)
        figures["comparison"] = str(out / "comparison.png")
    report = ProfileReport(f"torchopt bench: {args.model}", latency=results, figures=figures)
    report.notes.append(f"inputs: {', '.join(args.input)}; batch size {batch}")
    if speedups:
        report.notes.append(
            f"compiled vs eager: {speedups['compiled']}, median and middle 80% of paired ratios over 10"
            " alternating rounds"
        )
    json_path, md_path = report.save(out, "bench")
    print(latency_markdown(results, speedups))
    _print_outputs(json_path, md_path, figures)
    return 0


def run_profile(args: argparse.Namespace) -> int:
    """`torchopt profile`: trace (a stage per child module), memory per stage, latency, figures, report."""
    model, inputs, device, out, batch = _setup(args)
    figures: dict[str, str] = {}
    history = out / "alloc_history.pickle" if args.memory_history else None
    if history is not None and device.type != "cuda":
        raise ValueError("--memory-history records the CUDA caching allocator; the model runs on the CPU")
    with torch.inference_mode():
        print("timing ...", file=sys.stderr)
        lat = latency(
            model,
            *inputs,
            warmup=args.warmup,
            iters=args.iters,
            batch_size=batch,
            progress=not args.no_progress,
        )
    # Stages (hooks on the child modules) only for the trace and memory runs: they would add to the latency.
    with torch.inference_mode(), stage_modules(model) if _has_children(model) else contextlib.nullcontext():
        print("tracing ...", file=sys.stderr)
        tr = trace(
            model,
            *inputs,
            wait=args.wait,
            warmup=args.trace_warmup,
            active=args.active,
            with_stack=args.with_stack,
            record_shapes=args.record_shapes,
            max_trace_mb=args.max_trace_mb,
            trace_path=str(out / "trace.json.gz"),
        )
        print("measuring memory ...", file=sys.stderr)
        mem = memory(
            model,
            *inputs,
            device=str(device),
            record_history=history is not None,
            history_path=str(history) if history is not None else None,
        )
    plot_latency(lat, out / "latency.png", title=f"{args.model} latency")
    figures["latency"] = str(out / "latency.png")
    if tr.stage_events:
        plot_stage_timeline(tr, out / "stages.png", title=f"{args.model} stages")
        figures["stages"] = str(out / "stages.png")
    if mem.timeline:
        plot_memory(mem, out / "memory.png", title=f"{args.model} memory")
        figures["memory"] = str(out / "memory.png")
    report = ProfileReport(
        f"torchopt profile: {args.model}", latency={"eager": lat}, trace=tr, memory=mem, figures=figures
    )
    report.notes.append(f"inputs: {', '.join(args.input)}; batch size {batch}")
    json_path, md_path = report.save(out, "profile")
    print(lat)
    print(tr)
    extra = [f"trace: {tr.trace_path} (open in https://ui.perfetto.dev)"] if tr.trace_path else []
    if mem.history_path:
        extra.append(f"allocation history: {mem.history_path} (open in https://pytorch.org/memory_viz)")
    for w in tr.warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    _print_outputs(json_path, md_path, figures, extra)
    return 0


def _has_children(model: Any) -> bool:
    return any(True for _ in model.children())
