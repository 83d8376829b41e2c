"""Serve a saved torchopt model on a local Ray: start Ray, deploy `ray_deployment`, print the endpoint, serve
until Ctrl-C (or SIGTERM), then shut Serve and Ray down.

    python -m torchopt.serve.ray_cli resnet.torchopt --replicas 2 --port 8000
    curl -X POST http://127.0.0.1:8000/resnet.torchopt -d '[[...one item...]]'

Expected failures (no Ray, a bad artifact, a replica that cannot start) print one line and exit 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from torchopt.config import error_line
from torchopt.serve.ports import check_port
from torchopt.serve.ray_serving import RayServeConfig, plan_ray_serving, ray_deployment, replica_failure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m torchopt.serve.ray_cli", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the directory OptimizedModule.save wrote")
    parser.add_argument("--replicas", type=int, default=1, help="replicas to start (default 1)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (default 0)")
    parser.add_argument("--max-batch-size", type=int, default=None, help="default: the profile's max batch")
    parser.add_argument("--batch-wait-ms", type=float, default=None, help="default: derived (see the plan)")
    parser.add_argument("--latency-budget-ms", type=float, default=None)
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs the local Ray may use (default: all)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--route", default=None, help="route prefix (default /<artifact name>)")
    return parser


def _config(args: argparse.Namespace) -> RayServeConfig:
    return RayServeConfig(
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=None if args.batch_wait_ms is None else args.batch_wait_ms / 1e3,
        latency_budget_ms=args.latency_budget_ms,
        num_replicas=args.replicas,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
    )


def serve_until_stopped(args: argparse.Namespace, stop: threading.Event) -> None:
    """Start a local Ray, deploy, print the plan and the endpoint, wait for `stop`, shut everything down."""
    config = _config(args)
    plan = plan_ray_serving(args.path, config)  # a bad artifact fails here, before Ray starts
    check_port(args.port, args.host, "--port")  # so does a taken port (Serve's proxy would fail after Ray's start)
    import ray  # the optional extra: imported once there is something to serve
    from ray import serve

    route = args.route or "/" + Path(args.path).name
    t0 = time.perf_counter()
    # address="local": always a new cluster of our own, never one another process started.
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(ray_deployment(args.path, config).bind(), name=config.name, route_prefix=route)
        except RuntimeError as exc:  # Serve only says the deployment failed; the replica's error says why
            raise RuntimeError(replica_failure(config.name) or str(exc)) from None
        print(plan, flush=True)
        print(f"ready in {time.perf_counter() - t0:.1f} s: http://{args.host}:{args.port}{route}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


def one_line(exc: BaseException) -> str:
    """'Type: first line' of an error; for a Ray task's error, of its cause (the task's own first line is only
    'ray::Actor.method() (pid=..., ip=...)', the cause says why)."""
    cause = getattr(exc, "cause", None)
    shown = cause if isinstance(cause, BaseException) else exc
    return error_line(shown)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve_until_stopped(args, stop)
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (TypeError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped: Serve and Ray shut down", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
