"""`torchopt export-triton` and `torchopt serve`: a Triton model repository, and the real server on it.

    torchopt export-triton torchopt_out/optimize/optimized --repo model_repository --name resnet \\
        --latency-budget-ms 20 --preprocess '{"fit": "crop", "mean": [0.485, 0.456, 0.406]}'
    torchopt serve model_repository                      # until Ctrl-C
    torchopt serve model_repository --smoke 1000         # 1000 checked requests, then stop
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from torchopt.cli_args import add_config_arguments
from torchopt.engine import load as load_optimized
from torchopt.kernels import PreprocessConfig, preprocess_ref
from torchopt.serve.triton_config import TritonConfig, parse_model_config
from torchopt.serve.triton_repo import ARTIFACT_DIR, export_triton
from torchopt.serve.triton_server import TritonServer, smoke_test

__all__ = ["register", "run_export_triton", "run_serve"]

_OPTIONS = [
    f.name for f in TritonConfig.__dataclass_fields__.values() if f.name not in ("preferred_batch_sizes", "gpus")
]


def register(subparsers: Any) -> None:
    """Add the `export-triton` and `serve` subcommands to an argparse subparsers object."""
    p = subparsers.add_parser(
        "export-triton",
        help="write a Triton model repository from a saved optimized module",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="directory of a saved optimized module (torchopt optimize --save)")
    p.add_argument("--repo", required=True, help="model repository folder to write")
    p.add_argument("--name", default="model", help="model name in the repository (default: model)")
    p.add_argument("--platform", choices=["python", "tensorrt_plan", "torch_aoti"], default="python")
    p.add_argument("--artifact", default=None, help="engine (.plan) or AOTInductor package for those platforms")
    p.add_argument(
        "--preprocess", default=None, metavar="JSON", help="PreprocessConfig options as JSON: adds an ensemble"
    )
    p.add_argument("--overwrite", action="store_true", help="replace model folders that exist")
    add_config_arguments(p, TritonConfig, _OPTIONS)
    p.set_defaults(func=run_export_triton)

    s = subparsers.add_parser(
        "serve", help="run Triton Inference Server (bundled with nvidia-pytriton) on a repository"
    )
    s.add_argument("repo", help="model repository written by export-triton")
    s.add_argument("--smoke", type=int, default=None, metavar="N", help="send N checked requests, print, stop")
    s.add_argument("--concurrency", type=int, default=32, help="concurrent clients of --smoke (default: 32)")
    s.add_argument("--model", default=None, help="model --smoke targets (default: the ensemble, else the model)")
    s.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for the models to load")
    s.set_defaults(func=run_serve)


def run_export_triton(args: argparse.Namespace) -> int:
    options = {k: getattr(args, k) for k in _OPTIONS if getattr(args, k) is not None}
    pre = None
    if args.preprocess is not None:
        try:
            pre = PreprocessConfig.from_dict(json.loads(args.preprocess))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--preprocess must be a JSON object of PreprocessConfig options: {exc}") from None
    export = export_triton(
        args.source,
        args.repo,
        name=args.name,
        platform=args.platform,
        artifact=args.artifact,
        preprocess=pre,
        overwrite=args.overwrite,
        **options,
    )
    print(
        f"wrote {export.repo}: model {export.model!r}" + (f", ensemble {export.ensemble!r}" if export.ensemble else "")
    )
    print(
        f"max_batch_size {export.max_batch_size}, queue delay {export.queue_delay_us} µs ({export.queue_delay_reason})"
    )
    print(f"serve it: {export.server_command()}")
    return 0


def _repo_models(repo: Path) -> dict[str, Any]:
    models = {}
    for config in sorted(repo.glob("*/config.pbtxt")):
        models[config.parent.name] = parse_model_config(config.read_text(), str(config))
    if not models:
        raise ValueError(f"repo {str(repo)!r} holds no model (no */config.pbtxt): write one with export-triton")
    return models


def _smoke_target(models: dict[str, Any], wanted: str | None) -> tuple[str, Any, Path]:
    """The model to send requests to and the saved artifact whose module answers them locally."""
    if wanted is not None and wanted not in models:
        raise ValueError(f"--model {wanted!r} is not in the repository; models: {', '.join(models)}")
    ensembles = [n for n, m in models.items() if m.platform == "ensemble"]
    name = wanted or (ensembles[0] if ensembles else next(iter(models)))
    core = name
    if models[name].platform == "ensemble":
        core = models[name].ensemble_scheduling.step[-1].model_name
    if models[core].backend != "python":
        raise ValueError(f"--smoke checks Python-backend models against their saved module; {core!r} is not one")
    return name, models, Path(core) / "1" / ARTIFACT_DIR


def _smoke(server: TritonServer, models: dict[str, Any], target: str, artifact: Path, n: int, concurrency: int) -> int:
    module = load_optimized(server.repo / artifact, device="cpu")
    spec = module.profiles[0]
    proto = models[target]
    ensemble = proto.platform == "ensemble"
    outputs = [o.name for o in proto.output]
    pre = size = None
    if ensemble:
        params = models[proto.ensemble_scheduling.step[0].model_name].parameters
        pre = PreprocessConfig.from_dict(json.loads(params["preprocess"].string_value))
        size = tuple(json.loads(params["size"].string_value))
        # The ensemble's frame dims where fixed, else frames twice the model's input size.
        frame_dims = [d if d > 0 else 2 * size[min(i, 1)] for i, d in enumerate(proto.input[0].dims)]

    def make_inputs(i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        if ensemble:
            return {"frames": torch.randint(0, 256, (1, *frame_dims), generator=g, dtype=torch.uint8)}
        return {s.name: s.example("opt", seed=i)[:1] for s in spec}

    def reference(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            xs = [preprocess_ref(inputs["frames"], size, config=pre)] if ensemble else list(inputs.values())
            out = module.call_flat(*xs)
        flat = [out] if isinstance(out, torch.Tensor) else list(out.values()) if isinstance(out, dict) else list(out)
        return dict(zip(outputs, flat, strict=True))

    result = smoke_test(
        server, target, make_inputs=make_inputs, reference=reference, requests=n, concurrency=concurrency
    )
    core = proto.ensemble_scheduling.step[-1].model_name if ensemble else target
    result.batch_sizes = server.batch_sizes(core)  # the ensemble itself runs each request alone
    print(f"smoke {target}: {result.summary()}")
    for line in result.mismatches[:5]:
        print(f"  {line}", file=sys.stderr)
    return 0 if not result.mismatches and result.answered == n else 1


def run_serve(args: argparse.Namespace) -> int:
    repo = Path(args.repo)
    models = _repo_models(repo)
    target = artifact = None
    if args.smoke is not None:
        if args.smoke <= 0 or args.concurrency <= 0:
            raise ValueError(f"--smoke and --concurrency must be positive, got {args.smoke} and {args.concurrency}")
        target, _, artifact = _smoke_target(models, args.model)
    print(f"starting tritonserver on {repo} ({len(models)} models: {', '.join(models)})", file=sys.stderr)
    with TritonServer(repo, ready_timeout_s=args.ready_timeout) as server:
        print(f"ready in {server.startup_seconds:.1f} s: HTTP http://{server.http_url}, gRPC {server.grpc_url},")
        print(f"metrics http://127.0.0.1:{server.metrics_port}/metrics")
        if target is not None:
            return _smoke(server, models, target, artifact, args.smoke, args.concurrency)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while True:  # until Ctrl-C / SIGTERM; a server that dies is reported
            server.check_alive()
            time.sleep(0.5)
