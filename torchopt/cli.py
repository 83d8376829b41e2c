"""The `torchopt` command (also `python -m torchopt`).

torchopt demo                      optimize ResNet-50 (random weights) with the best recipe for this machine
torchopt optimize MODEL ...        optimize a model given as module:callable or a torchvision name
torchopt recipes [NAME]            list the built-in recipes, or print one as YAML
torchopt bench / profile / find-batch   (see `torchopt COMMAND --help`)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

__all__ = ["MODEL_HELP", "add_model_arguments", "main"]

# Feature packages that add their own subcommands through `register(subparsers)`.
_PLUGINS = ["torchopt.profile.cli", "torchopt.batch.cli"]


MODEL_HELP = "torchvision name (random weights), module:callable or file.py:callable"


def add_model_arguments(parser: argparse.ArgumentParser, input_help: str, *, required: bool = True) -> None:
    """The positional MODEL and the repeatable --input SPEC that every model-taking subcommand shares."""
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--input", action="append", metavar="SPEC", required=required, help=input_help)


def _writable_dir(text: str) -> Path:
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"--out {text!r} cannot be created: {exc}") from None
    return path


def _write_outputs(optimized, out: Path) -> None:
    report = optimized.report
    (out / "report.md").write_text(report.to_markdown())
    report.to_json(out / "report.json")
    figure = report.plot(out / "report.png")
    print(f"\nreport: {out / 'report.md'}, {out / 'report.json'}; figure: {figure}")


def _run_optimize(model_spec: str, recipe: str, inputs, args) -> int:
    import torchopt  # noqa: PLC0415
    from torchopt.models import load_model  # noqa: PLC0415

    model = load_model(model_spec)
    print(f"optimizing {model_spec} with recipe {recipe!r}", file=sys.stderr)
    optimized = torchopt.optimize(model, recipe, inputs=inputs, device=args.device)
    print(optimized.report)
    _write_outputs(optimized, args.out)
    if getattr(args, "save", False):
        print(f"saved optimized module to {optimized.save(args.out / 'optimized')}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from torchopt.models import DEMO_MODEL, demo_inputs  # noqa: PLC0415

    on_gpu = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    # CPU: a small batch range keeps the demo to a few minutes on 2 cores.
    batch = (1, 32, 64) if on_gpu else (1, 4, 8)
    print(
        f"torchopt demo: {DEMO_MODEL} (random weights), batch {batch[0]}..{batch[2]} (opt {batch[1]}),"
        f" recipe {args.recipe!r}",
        file=sys.stderr,
    )
    return _run_optimize(args.model or DEMO_MODEL, args.recipe, demo_inputs(batch), args)


def _cmd_optimize(args: argparse.Namespace) -> int:
    from torchopt.inputs import parse_input_spec  # noqa: PLC0415

    if not args.input:
        raise SystemExit(
            "torchopt optimize: give at least one --input name[:dtype]=DIMxDIM..., e.g. x=1-8-32x3x224x224"
        )
    inputs = [parse_input_spec(t) for t in args.input]
    return _run_optimize(args.model, args.recipe, inputs, args)


def _cmd_recipes(args: argparse.Namespace) -> int:
    from torchopt import recipes  # noqa: PLC0415

    if args.name:
        print(recipes.get(args.name).to_yaml(), end="")
        return 0
    for name in recipes.available():
        print(f"{name:16s} {recipes.get(name).description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchopt", description="PyTorch inference optimization toolkit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, out: str) -> None:
        p.add_argument("--recipe", default="default", help="built-in recipe name or YAML file (default: default)")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        p.add_argument("--out", type=_writable_dir, default=Path(out), help=f"output directory (default: {out})")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError) as exc:  # bad input: one clear line, not a traceback
        print(f"torchopt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
