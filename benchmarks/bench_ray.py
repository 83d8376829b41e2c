"""Offline inference over N uint8 images: Ray Data `map_batches(RayPredictor)` against a plain loop over the same
saved model, both at the batch size `ray_batch_size` (find_optimal_batch) picks.

    python benchmarks/bench_ray.py                          # CPU; writes benchmarks/results/bench_ray.*
    python benchmarks/bench_ray.py --device cuda --images 20000 --concurrency 1 --recipe default

Both paths preprocess the frames with `torchopt.kernels.preprocess` (resize + normalize) and run the saved model.
Reported per path: images/s (median of `--repeats` runs with the min-max spread; a spread over 10 % of the median
is labelled unstable) and the share of time spent outside the model (1 - model time / (wall time x workers)):
the cost of getting data in and results out (preprocessing included). Ray's start is timed apart and not
counted; Ray Data starts its workers within each run, so their start-up (process, torch import, artifact load,
warm-up) is counted, as a job would pay it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _results import write_results

import torchopt
from torchopt import Recipe
from torchopt.environment import environment
from torchopt.kernels import IMAGENET_MEAN, IMAGENET_STD, preprocess
from torchopt.recipes import CompileConfig, ValidateConfig
from torchopt.serve import RayPredictor, predictor_options, ray_batch_size
from torchopt.serve.ray_serving import ServedModel

RESULTS = Path(__file__).resolve().parent / "results"
UNSTABLE_SPREAD_PCT = 10.0
IMAGE_HW = (96, 128)  # source frames (H, W), uint8 RGB
MODEL_HW = (64, 64)  # what the model takes after preprocessing
NORM = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x))


def save_artifact(path: Path, recipe: str, device: str, max_batch: int) -> Path:
    spec = torchopt.InputSpec("image", min=(1, 3, *MODEL_HW), opt=(32, 3, *MODEL_HW), max=(max_batch, 3, *MODEL_HW))
    chosen = (
        Recipe([CompileConfig(backend="eager"), ValidateConfig(measure_latency=False)]) if recipe == "eager" else recipe
    )
    fast = torchopt.optimize(SmallCNN().eval(), chosen, inputs=[spec], device=device, progress=False)
    return fast.save(path)


def timed(served: ServedModel) -> list[float]:
    """Wrap `served.run_batch` so every model call's seconds are recorded (synchronized on CUDA)."""
    spent: list[float] = []
    run_batch = served.run_batch

    def run(inputs):
        t0 = time.perf_counter()
        out = run_batch(inputs)  # ends with the outputs copied to the CPU: the device work is done
        spent.append(time.perf_counter() - t0)
        return out

    served.run_batch = run
    return spent


class TimedPredictor(RayPredictor):
    """RayPredictor plus a `model_s` column: each row's share of its batch's model time."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.spent = timed(self.served)

    def __call__(self, batch):
        before, started = len(self.spent), time.time()
        out = super().__call__(batch)
        rows = len(out["output"])
        out["model_s"] = np.full(rows, sum(self.spent[before:]) / rows)
        # Wall-clock stamps (one clock for all workers on this machine): the span from the first batch's start
        # to the last batch's end is the run without the workers' start-up.
        out["t_start"], out["t_end"] = np.full(rows, started), np.full(rows, time.time())
        return out


def loop_once(path: Path, images: np.ndarray, batch: int, device: str, threads: int) -> dict:
    served = ServedModel(path, device=device, num_threads=threads)
    served.warm_up()
    spent = timed(served)
    t0 = time.perf_counter()
    outputs = []
    for start in range(0, len(images), batch):
        frames = torch.from_numpy(images[start : start + batch]).to(device)
        x = preprocess(frames, MODEL_HW, **NORM)
        outputs.append(served.run_batch([x])[0].shape)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "model_s": sum(spent), "workers": 1}


def ray_once(path: Path, images: np.ndarray, batch: int, concurrency: int, num_gpus: float, num_cpus: float) -> dict:
    import ray

    # One column "data" of (H, W, 3) uint8 rows, in blocks enough for every worker (one block feeds one worker).
    ds = ray.data.from_numpy(np.array_split(images, 4 * concurrency))
    options = predictor_options(
        path, batch_size=batch, concurrency=concurrency, num_gpus=num_gpus, num_cpus=num_cpus, preprocess=dict(NORM)
    )
    t0 = time.perf_counter()
    refs = ds.map_batches(TimedPredictor, **options).select_columns(["model_s", "t_start", "t_end"]).to_numpy_refs()
    parts = ray.get(refs)
    wall = time.perf_counter() - t0
    model_s = float(sum(np.sum(p["model_s"]) for p in parts))
    batches_s = max(p["t_end"].max() for p in parts) - min(p["t_start"].min() for p in parts)
    return {"wall_s": wall, "model_s": model_s, "workers": concurrency, "batches_s": float(batches_s)}


def summarize(runs: list[dict], n: int, wall: str = "wall_s") -> dict:
    rates = [n / r[wall] for r in runs]
    outside = [max(0.0, 1 - r["model_s"] / (r[wall] * r["workers"])) for r in runs]
    med = statistics.median(rates)
    spread = (max(rates) - min(rates)) / med * 100
    return {
        "images_per_s": med,
        "min": min(rates),
        "max": max(rates),
        "unstable": spread > UNSTABLE_SPREAD_PCT,
        "outside_model_share": statistics.median(outside),
        "runs": runs,
    }


def bench(args) -> dict:
    import ray

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = save_artifact(work / "cnn.torchopt", args.recipe, args.device, args.max_batch)
    t0 = time.perf_counter()
    batch = args.batch or ray_batch_size(path, device=args.device, latency_budget_ms=args.latency_budget_ms)
    finder_s = time.perf_counter() - t0
    images = np.random.default_rng(0).integers(0, 256, (args.images, *IMAGE_HW, 3), dtype=np.uint8)

    loop = [loop_once(path, images, batch, args.device, args.loop_threads) for _ in range(args.repeats)]
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - t0
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        num_gpus = 1.0 if args.device == "cuda" else 0.0
        ray_runs = [
            ray_once(path, images, batch, args.concurrency, num_gpus, args.worker_cpus) for _ in range(args.repeats)
        ]
    finally:
        ray.shutdown()
    return {
        "images": args.images,
        "image_hw": IMAGE_HW,
        "model_hw": MODEL_HW,
        "batch_size": batch,
        "batch_size_source": "given" if args.batch else "ray_batch_size (find_optimal_batch)",
        "finder_s": finder_s,
        "ray_start_s": ray_start_s,
        "concurrency": args.concurrency,
        "loop_threads": args.loop_threads,
        "worker_cpus": args.worker_cpus,
        "recipe": args.recipe,
        "loop": summarize(loop, args.images),
        "ray": summarize(ray_runs, args.images),
        "ray_batches_only": summarize(ray_runs, args.images, wall="batches_s"),
        "ray_version": ray.__version__,
        "environment": environment(),
        "device": args.device,
    }


def markdown(res: dict) -> str:
    env = res["environment"]
    where = env.get("gpu") or f"CPU ({env.get('cpu_count', '?')} cores)"
    lines = [
        f"# Ray Data map_batches vs a plain loop ({res['images']} images {res['image_hw']} → {res['model_hw']})",
        "",
        f"{where}, torch {env.get('torch')}, ray {res['ray_version']}, {env.get('date', '')}. Recipe"
        f" {res['recipe']!r}, batch {res['batch_size']} ({res['batch_size_source']}, {res['finder_s']:.1f} s),"
        f" Ray start {res['ray_start_s']:.1f} s (not counted); {res['concurrency']} Ray worker(s) of"
        f" {res['worker_cpus']} CPU, the loop on {res['loop_threads']} torch thread(s). The Ray figure includes"
        " starting its workers (process, torch import, artifact load, warm-up) on every run.",
        "",
        "| path | images/s (median) | min–max | outside the model |",
        "|---|---|---|---|",
    ]
    names = {
        "loop": "plain loop",
        "ray": "Ray Data, whole run",
        "ray_batches_only": "Ray Data, first batch start → last batch end (no worker start-up)",
    }
    for key, name in names.items():
        r = res[key]
        flag = " UNSTABLE" if r["unstable"] else ""
        lines.append(
            f"| {name} | {r['images_per_s']:.0f}{flag} | {r['min']:.0f}–{r['max']:.0f} |"
            f" {100 * r['outside_model_share']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="default: ray_batch_size (find_optimal_batch)")
    ap.add_argument("--max-batch", type=int, default=128, help="the saved profile's max batch")
    ap.add_argument("--latency-budget-ms", type=float, default=None)
    ap.add_argument("--recipe", default="eager", help="'eager' (fast to build on CPU) or a recipe name")
    ap.add_argument("--concurrency", type=int, default=2, help="Ray Data workers (actors)")
    ap.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs per Ray worker")
    ap.add_argument(
        "--loop-threads", type=int, default=1, help="torch threads of the plain loop (a Ray worker gets its CPUs)"
    )
    ap.add_argument("--ray-cpus", type=int, default=None, help="CPUs the local Ray may use (default: all)")
    ap.add_argument("--work", default="/tmp/torchopt_bench_ray")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    res = bench(args)
    write_results(res, markdown(res), args.out, "bench_ray")


if __name__ == "__main__":
    main()
