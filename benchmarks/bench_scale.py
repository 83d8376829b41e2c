"""Scaling from one GPU to two: Triton (instance_group over GPUs), Ray Serve (replicas with num_gpus=1) and Ray
Data (map_batches workers with num_gpus=1), each against the same engine on one GPU. Needs >= 2 visible GPUs.

    python benchmarks/bench_scale.py                 # all parts, writes benchmarks/results/bench_scale.{json,md}
    python benchmarks/bench_scale.py --dry-run       # print the plan (runs anywhere, starts nothing)
    python benchmarks/bench_scale.py --parts triton --models resnet50 --concurrency 64

Models: ResNet-50 fp16 (torchvision, random weights, 3x224x224) and a BERT-base-sized encoder fp16
(nn.TransformerEncoder, 12 layers, d_model 768, 12 heads, FFN 3072, sequence 128, hidden states as input). Each is
optimized once on cuda:0 with `--recipe` and saved; every engine loads the artifact on its own GPU.

- Triton: `export_triton(..., instance_kind="gpu", gpus=[0])` against `gpus=[0, 1]` (count 1 each, the Python
  backend: each stub loads on its `model_instance_device_id`); closed-loop gRPC clients, one item per request, at
  each `--concurrency`; p50/p99 per request, requests/s, the server's batch sizes.
- Ray Serve: `ray_deployment(num_replicas=1|2, num_gpus=1)`, the same clients through a deployment handle.
- Ray Data: `map_batches(RayPredictor, concurrency=1|2, num_gpus=1)` over `--images` uint8 frames through the
  preprocessing kernel (ResNet-50 only: the frames are images); the share of time outside the model.

Every figure is the median of `--repeats` runs with its min-max; a spread over 10 % of the median is labelled
unstable, and a ratio's range is worst-case (min of 2 GPUs / max of 1 GPU .. max / min). What can limit scaling is
measured next to it: the host's CPU busy share during each run (clients, the server's stubs, Ray all share it) and
the server batch sizes (a batcher that forms small batches at 2 GPUs halves each GPU's load).

NVLink multicast stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are
set in this process's environment before torch is imported, and so in tritonserver and every Ray worker (they
inherit it; Ray's runtime_env sets them too). Nothing here uses collectives.
"""

from __future__ import annotations

import os

NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NVLS_OFF)

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _results import write_results  # noqa: E402

import torchopt  # noqa: E402
from torchopt import Recipe  # noqa: E402
from torchopt.environment import environment  # noqa: E402
from torchopt.kernels import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from torchopt.profile.stats import percentile  # noqa: E402
from torchopt.recipes import CompileConfig, ValidateConfig  # noqa: E402
from torchopt.serve import RayPredictor, predictor_options  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
UNSTABLE_SPREAD_PCT = 10.0
GOAL_RATIO = 1.8
MODELS = ("resnet50", "encoder")
PARTS = ("triton", "ray_serve", "ray_data")
FRAME_HW = (256, 320)  # Ray Data source frames (H, W), uint8 RGB; preprocessed to 224x224
SEQ, D_MODEL = 128, 768


def build_model(name: str) -> tuple[torch.nn.Module, torchopt.InputSpec]:
    """The fp16 model (random weights) and its input profile."""
    if name == "resnet50":
        import torchvision

        model = torchvision.models.resnet50(weights=None)
        spec = torchopt.InputSpec(
            "image", dtype="float16", min=(1, 3, 224, 224), opt=(64, 3, 224, 224), max=(256, 3, 224, 224)
        )
    else:
        layer = torch.nn.TransformerEncoderLayer(D_MODEL, 12, 3072, dropout=0.0, batch_first=True)
        model = torch.nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
        spec = torchopt.InputSpec(
            "hidden", dtype="float16", min=(1, SEQ, D_MODEL), opt=(32, SEQ, D_MODEL), max=(128, SEQ, D_MODEL)
        )
    return model.half().eval(), spec


def save_artifact(name: str, work: Path, recipe: str) -> Path:
    model, spec = build_model(name)
    chosen = (
        Recipe([CompileConfig(backend="eager"), ValidateConfig(measure_latency=False)]) if recipe == "eager" else recipe
    )
    fast = torchopt.optimize(model, chosen, inputs=[spec], device="cuda:0", progress=False)
    return fast.save(work / f"{name}.torchopt")


def item(name: str, i: int) -> torch.Tensor:
    """Request i's input (no batch dim), fp16 on the host."""
    shape = (3, 224, 224) if name == "resnet50" else (SEQ, D_MODEL)
    return torch.randn(shape, generator=torch.Generator().manual_seed(i)).half()


# ------------------------------------------------------------------------------------------------ measurement


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole host, from /proc/stat (0, 0 where it does not exist)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else None


def closed_loop(send: Callable[[int], None], concurrency: int, requests: int) -> dict:
    """`concurrency` threads send `requests` requests in all, each waiting for its answer before the next."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        mine = []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            t0 = time.perf_counter()
            send(i)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    cpu0, t0 = cpu_times(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "requests_per_s": len(lat) / wall,
        "p50_ms": percentile(lat, 50) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
        "host_cpu_busy": busy_share(cpu0, cpu_times()),
        "wall_s": wall,
    }


def summarize(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    med = statistics.median(values)
    spread = (max(values) - min(values)) / med * 100 if med else 0.0
    return {"median": med, "min": min(values), "max": max(values), "unstable": spread > UNSTABLE_SPREAD_PCT}


def ratio(two: dict, one: dict) -> dict:
    """2-GPU over 1-GPU median, with the worst-case range of the runs and the goal verdict."""
    r = {
        "median": two["median"] / one["median"],
        "low": two["min"] / one["max"],
        "high": two["max"] / one["min"],
        "unstable": two["unstable"] or one["unstable"],
    }
    r["meets_goal"] = r["median"] >= GOAL_RATIO
    return r


def repeated(run: Callable[[], dict], repeats: int, keys: tuple[str, ...]) -> dict:
    runs = [run() for _ in range(repeats)]
    return {"runs": runs, **{k: summarize(runs, k) for k in keys if all(r.get(k) is not None for r in runs)}}


# ------------------------------------------------------------------------------------------------ the parts


def triton_sender(server, name: str) -> Callable[[int], None]:
    """Send request i to `server` from this thread's own gRPC client, one fp16 item per request."""
    import tritonclient.grpc as grpcclient

    local = threading.local()
    payloads = [item(name, i).unsqueeze(0).numpy() for i in range(64)]
    in_name = "image" if name == "resnet50" else "hidden"

    def send(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(server.grpc_url)
        inp = grpcclient.InferInput(in_name, list(payloads[i % 64].shape), "FP16")
        inp.set_data_from_numpy(payloads[i % 64])
        local.client.infer(name, [inp], client_timeout=120)

    return send


def triton_part(name: str, path: Path, work: Path, args) -> dict:
    from torchopt.serve import TritonServer, export_triton

    out: dict = {}
    for gpus in ([0], [0, 1]):
        repo = work / f"triton_{name}_{len(gpus)}gpu"
        export_triton(path, repo, name=name, instance_kind="gpu", gpus=gpus, instance_count=1, overwrite=True)
        with TritonServer(repo, ready_timeout_s=600) as server:
            send = triton_sender(server, name)
            closed_loop(send, max(args.concurrency), args.warmup_requests)
            for c in args.concurrency:
                before = server.batch_sizes(name)
                res = repeated(lambda c=c, send=send: closed_loop(send, c, args.requests), args.repeats, LOAD_KEYS)
                after = server.batch_sizes(name)
                res["server_batches"] = {b: n - before.get(b, 0) for b, n in after.items() if n - before.get(b, 0)}
                out[f"{len(gpus)}gpu_c{c}"] = res
    return with_ratios(out, args.concurrency, "requests_per_s")


def handle_sender(handle, name: str) -> Callable[[int], None]:
    payloads = [item(name, i) for i in range(64)]
    return lambda i: handle.remote(payloads[i % 64]).result()


def ray_serve_part(name: str, path: Path, args) -> dict:
    from ray import serve

    from torchopt.serve import ray_deployment

    out: dict = {}
    for replicas in (1, 2):
        app_name = f"scale_{name}_{replicas}"
        app = ray_deployment(path, num_replicas=replicas, num_gpus=1, num_cpus=args.replica_cpus, name=app_name)
        send = handle_sender(serve.run(app.bind(), name=app_name, route_prefix=None), name)
        try:
            closed_loop(send, max(args.concurrency), args.warmup_requests)
            for c in args.concurrency:
                run = lambda c=c, send=send: closed_loop(send, c, args.requests)  # noqa: E731
                out[f"{replicas}gpu_c{c}"] = repeated(run, args.repeats, LOAD_KEYS)
        finally:
            serve.delete(app_name)
    return with_ratios(out, args.concurrency, "requests_per_s")


class TimedPredictor(RayPredictor):
    """RayPredictor plus a `model_s` column: each row's share of its batch's model time (synchronized)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.spent: list[float] = []
        run_batch = self.served.run_batch

        def run(inputs):
            t0 = time.perf_counter()
            out = run_batch(inputs)  # ends with the outputs on the host: the device work is done
            self.spent.append(time.perf_counter() - t0)
            return out

        self.served.run_batch = run

    def __call__(self, batch):
        before = len(self.spent)
        out = super().__call__(batch)
        rows = len(out["output"])
        out["model_s"] = np.full(rows, sum(self.spent[before:]) / rows)
        return out


def ray_data_part(path: Path, args) -> dict:
    import ray

    frames = np.random.default_rng(0).integers(0, 256, (args.images, *FRAME_HW, 3), dtype=np.uint8)
    out: dict = {}
    for workers in (1, 2):
        options = predictor_options(
            path,
            batch_size=args.data_batch,
            concurrency=workers,
            num_gpus=1,
            num_cpus=args.replica_cpus,
            preprocess={"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        )

        def run(options=options, workers=workers) -> dict:
            ds = ray.data.from_numpy(np.array_split(frames, 8 * workers))
            cpu0, t0 = cpu_times(), time.perf_counter()
            parts = ray.get(ds.map_batches(TimedPredictor, **options).select_columns(["model_s"]).to_numpy_refs())
            wall = time.perf_counter() - t0
            model_s = float(sum(np.sum(p["model_s"]) for p in parts))
            return {
                "images_per_s": args.images / wall,
                "outside_model_share": max(0.0, 1 - model_s / (wall * workers)),
                "host_cpu_busy": busy_share(cpu0, cpu_times()),
                "wall_s": wall,
            }

        out[f"{workers}gpu"] = repeated(run, args.repeats, ("images_per_s", "outside_model_share", "host_cpu_busy"))
    out["ratio"] = ratio(out["2gpu"]["images_per_s"], out["1gpu"]["images_per_s"])
    return out


LOAD_KEYS = ("requests_per_s", "p50_ms", "p99_ms", "host_cpu_busy")


def with_ratios(out: dict, concurrency: list[int], key: str) -> dict:
    for c in concurrency:
        out[f"ratio_c{c}"] = ratio(out[f"2gpu_c{c}"][key], out[f"1gpu_c{c}"][key])
    return out


# ------------------------------------------------------------------------------------------------ driver


def plan(args) -> list[str]:
    lines = []
    for name in args.models:
        if "triton" in args.parts:
            lines.append(f"triton     {name}: gpus=[0] vs [0, 1] (KIND_GPU, count 1), concurrency {args.concurrency}")
        if "ray_serve" in args.parts:
            lines.append(f"ray_serve  {name}: 1 vs 2 replicas (num_gpus=1), concurrency {args.concurrency}")
    if "ray_data" in args.parts and "resnet50" in args.models:
        lines.append(f"ray_data   resnet50: 1 vs 2 workers (num_gpus=1), {args.images} uint8 frames {FRAME_HW}")
    return [
        f"{line}; {args.repeats} repeats of {args.requests} requests" if "ray_data" not in line else line
        for line in lines
    ]


def bench(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"environment": environment("cuda:0"), "gpus": [torch.cuda.get_device_name(i) for i in range(2)]}
    res["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "work")}
    res["nvls_env"] = dict(NVLS_OFF)
    paths = {name: save_artifact(name, work, args.recipe) for name in args.models}
    ray_parts = [p for p in args.parts if p.startswith("ray")]
    if ray_parts:
        import ray

        ray.init(
            address="local", include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": dict(NVLS_OFF)}
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        res["ray_version"] = ray.__version__
    try:
        for name in args.models:
            if "triton" in args.parts:
                res[f"triton_{name}"] = triton_part(name, paths[name], work, args)
            if "ray_serve" in args.parts:
                res[f"ray_serve_{name}"] = ray_serve_part(name, paths[name], args)
        if "ray_data" in args.parts and "resnet50" in paths:
            res["ray_data_resnet50"] = ray_data_part(paths["resnet50"], args)
    finally:
        if ray_parts:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    return res


def _fmt(s: dict, fmt: str = "{:.0f}") -> str:
    flag = " UNSTABLE" if s["unstable"] else ""
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])}){flag}"


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [
        "# Scaling from 1 to 2 GPUs",
        "",
        f"{' + '.join(res['gpus'])}; torch {env.get('torch')}, torchopt {env.get('torchopt')},"
        f" ray {res.get('ray_version', '-')}, {env.get('date')}. Recipe {res['settings']['recipe']!r}. Medians of"
        f" {res['settings']['repeats']} runs (min–max); ratio ranges are worst-case; goal ≥ {GOAL_RATIO}x.",
        "",
        "| engine | model | load | 1 GPU | 2 GPUs | ratio | p50 / p99 ms (1 → 2 GPUs) | host CPU busy (1 → 2) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, part in res.items():
        if not key.startswith(("triton_", "ray_serve_")):
            continue
        engine, model = key.rsplit("_", 1)
        for c in res["settings"]["concurrency"]:
            one, two, r = part[f"1gpu_c{c}"], part[f"2gpu_c{c}"], part[f"ratio_c{c}"]
            lat = " / ".join(f"{one[k]['median']:.1f} → {two[k]['median']:.1f}" for k in ("p50_ms", "p99_ms"))
            cpu = (
                f"{one['host_cpu_busy']['median']:.0%} → {two['host_cpu_busy']['median']:.0%}"
                if "host_cpu_busy" in one
                else "-"
            )
            verdict = "meets" if r["meets_goal"] else "MISSES"
            lines.append(
                f"| {engine} | {model} | {c} clients | {_fmt(one['requests_per_s'])} req/s"
                f" | {_fmt(two['requests_per_s'])} req/s | {r['median']:.2f}x ({r['low']:.2f}–{r['high']:.2f})"
                f" {verdict} | {lat} | {cpu} |"
            )
    if "ray_data_resnet50" in res:
        d = res["ray_data_resnet50"]
        one, two, r = d["1gpu"], d["2gpu"], d["ratio"]
        lines.append(
            f"| ray_data | resnet50 | {res['settings']['images']} frames | {_fmt(one['images_per_s'])} img/s |"
            f" {_fmt(two['images_per_s'])} img/s | {r['median']:.2f}x ({r['low']:.2f}–{r['high']:.2f})"
            f" {'meets' if r['meets_goal'] else 'MISSES'} | outside the model:"
            f" {one['outside_model_share']['median']:.0%} → {two['outside_model_share']['median']:.0%} | - |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--concurrency", nargs="+", type=int, default=[64, 256], help="closed-loop clients")
    ap.add_argument("--requests", type=int, default=20000, help="requests per measured run")
    ap.add_argument("--warmup-requests", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=20000, help="Ray Data frames (the issue asks for >= 20000)")
    ap.add_argument("--data-batch", type=int, default=128, help="Ray Data batch size")
    ap.add_argument("--replica-cpus", type=float, default=4.0, help="CPUs per Ray Serve replica / Ray Data worker")
    ap.add_argument("--recipe", default="default", help="'eager' (no compilation) or a recipe name")
    ap.add_argument("--work", default="/tmp/torchopt_bench_scale")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    args = ap.parse_args(argv)
    for c in args.concurrency:
        if c < 1:
            ap.error(f"--concurrency values must be >= 1, got {c}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print("\n".join(plan(args)))
        return 0
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < 2:
        print(
            f"bench_scale needs >= 2 visible CUDA GPUs, found {visible}"
            f" (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')});"
            " run it on the nvidia-h200-x2 kind",
            file=sys.stderr,
        )
        return 2
    res = bench(args)
    write_results(res, markdown(res), args.out, "bench_scale")
    return 0


if __name__ == "__main__":
    sys.exit(main())
