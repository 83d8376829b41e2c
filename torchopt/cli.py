"""The `torchopt` command (also `python -m torchopt`).

torchopt demo                      optimize ResNet-50 (random weights) with the best recipe for this machine
torchopt optimize MODEL ...        optimize a model given as module:callable or a torchvision name
torchopt recipes [NAME]            list the built-in recipes, or print one as YAML
torchopt bench / profile / find-batch / export-triton / serve   (see `torchopt COMMAND --help`)
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import textwrap
import traceback
from pathlib import Path

import torch

import torchopt
from torchopt import recipes
from torchopt.backends import BackendUnavailableError
from torchopt.calib_source import load_calib_data
from torchopt.cli_args import MODEL_HELP, add_model_arguments, check_out_dir
from torchopt.inputs import parse_input_spec
from torchopt.models import DEMO_MODEL, ModelLoadError, demo_inputs, load_model
from torchopt.serve.triton_server import TritonServerError

__all__ = ["MODEL_HELP", "add_model_arguments", "check_out_dir", "main"]

# Feature packages that add their own subcommands through `register(subparsers)`.
_PLUGINS = ["torchopt.profile.cli", "torchopt.batch.cli", "torchopt.serve.cli"]


CALIB_HELP = (
    "calibration data for quantizing recipes: a folder of images, a .pt/.npy tensor of samples (dim 0), or"
    " module:callable / file.py:callable returning an iterable of batches"
)

# Failures a CLI user can fix (bad input, the environment, the model's own file, accuracy): one line and this
# exit code. Anything else is a bug and keeps its traceback.
_BAD_INPUT = (ValueError, TypeError)
_EXPECTED = (
    BackendUnavailableError,
    ModelLoadError,
    ImportError,
    OSError,
    torchopt.AccuracyError,
    TritonServerError,
)


def _write_outputs(optimized, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = optimized.report
    (out / "report.md").write_text(report.to_markdown())
    report.to_json(out / "report.json")
    figure = report.plot(out / "report.png")
    print(f"\nreport: {out / 'report.md'}, {out / 'report.json'}; figure: {figure}")


def _run_optimize(model_spec: str, recipe: str, inputs, args) -> int:
    out = Path(args.out)
    check_out_dir(out)
    calib = load_calib_data(args.calib, inputs) if args.calib is not None else None
    model = load_model(model_spec)
    print(f"optimizing {model_spec} with recipe {recipe!r}", file=sys.stderr)
    optimized = torchopt.optimize(model, recipe, inputs=inputs, calib_data=calib, device=args.device)
    print(optimized.report)
    _write_outputs(optimized, out)
    if args.save:
        print(f"saved optimized module to {optimized.save(out / 'optimized')}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    on_gpu = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    # CPU: a small batch range keeps the demo to a few minutes on 2 cores.
    batch = (1, 32, 64) if on_gpu else (1, 4, 8)
    print(
        f"torchopt demo: {args.model or DEMO_MODEL} (random weights), batch {batch[0]}..{batch[2]}"
        f" (opt {batch[1]}), recipe {args.recipe!r}",
        file=sys.stderr,
    )
    return _run_optimize(args.model or DEMO_MODEL, args.recipe, demo_inputs(batch), args)


def _cmd_optimize(args: argparse.Namespace) -> int:
    if not args.input:
        raise SystemExit(
            "torchopt optimize: give at least one --input name[:dtype]=DIMxDIM..., e.g. x=1-8-32x3x224x224"
        )
    inputs = [parse_input_spec(t) for t in args.input]
    return _run_optimize(args.model, args.recipe, inputs, args)


def _wrap_listing(rows: list[tuple[str, str]], width: int) -> list[str]:
    """``name  description`` rows, descriptions wrapped to `width` with a hanging indent under the first line."""
    name_width = max(16, *(len(name) + 1 for name, _ in rows))
    indent = " " * (name_width + 1)
    lines = []
    for name, text in rows:
        first = f"{name:{name_width}s} "
        wrapped = textwrap.wrap(
            " ".join(text.split()),
            width=max(width, len(indent) + 20),  # a very narrow terminal still gets readable lines
            initial_indent=first,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )
        lines.extend(wrapped or [first.rstrip()])
    return lines


def _cmd_recipes(args: argparse.Namespace) -> int:
    if args.name:
        print(recipes.get(args.name).to_yaml(), end="")
        return 0
    width = shutil.get_terminal_size((100, 24)).columns
    rows = [(name, recipes.get(name).description or "") for name in recipes.available()]
    print("\n".join(_wrap_listing(rows, width)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchopt", description="PyTorch inference optimization toolkit")
    parser.add_argument("--verbose", action="store_true", help="show the full traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument("--recipe", default="default", help="built-in recipe name or YAML file (default: default)")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        p.add_argument("--calib", default=None, metavar="SOURCE", help=CALIB_HELP)
        p.add_argument(
            "--out", default=out, help=f"output directory, created when the outputs are written (default: {out})"
        )
        p.add_argument("--save", action="store_true", help="also save the optimized module under OUT/optimized")

    demo = sub.add_parser("demo", help="optimize ResNet-50 (random weights) with the best recipe for this machine")
    demo.add_argument("--model", default=None, help="another torchvision name or module:callable")
    common(demo, "torchopt_out/demo")
    demo.set_defaults(func=_cmd_demo)

    opt = sub.add_parser("optimize", help="optimize a model (module:callable, file.py:callable or torchvision name)")
    add_model_arguments(
        opt, "input spec name[:dtype]=DIMxDIM..., DIM = N or MIN-OPT-MAX; repeat per input", required=False
    )
    common(opt, "torchopt_out/optimize")
    opt.set_defaults(func=_cmd_optimize)

    rec = sub.add_parser("recipes", help="list the built-in recipes, or print one as YAML")
    rec.add_argument("name", nargs="?")
    rec.set_defaults(func=_cmd_recipes)

    for plugin in _PLUGINS:
        try:
            module = importlib.import_module(plugin)
        except ModuleNotFoundError as exc:
            if exc.name != plugin:
                raise
            continue
        module.register(sub)
    for command in sub.choices.values():  # `torchopt COMMAND ... --verbose` works too (SUPPRESS: keep the top's)
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):  # not wrapped by load_model: name the file and line ourselves
        return f"{exc.filename}:{exc.lineno}: SyntaxError: {exc.msg}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError | ImportError):  # "No such file..." alone does not say what kind of failure
        return f"{type(exc).__name__}: {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run the `torchopt` command; returns its exit code (2: bad input, 1: another expected failure)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (*_BAD_INPUT, *_EXPECTED, SyntaxError) as exc:
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose or isinstance(exc, _BAD_INPUT) else " (--verbose shows the traceback)"
        print(f"torchopt {args.command}: error: {_one_line(exc)}{hint}", file=sys.stderr)
        return 2 if isinstance(exc, _BAD_INPUT) else 1
    except KeyboardInterrupt:
        print(f"torchopt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
