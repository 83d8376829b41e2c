"""Serving side by side: per-request calls, the in-process `DynamicBatcher` and the real Triton server on the
repository `export_triton` wrote, at concurrency 1, 8 and 64, in one run.

    python benchmarks/bench_serve.py                          # CPU CNN; ~2-5 min on 2 cores
    python benchmarks/bench_serve.py --instances 2            # two server model instances (instance_group count)
    python benchmarks/bench_serve.py --device cuda --client-procs 8   # ResNet-50 fp16, a BERT-base-sized encoder

Results: results/bench_serve_<device>[_instances<N>].{json,md}.

Per workload the model is optimized with an `auto_batch` step (`find_optimal_batch` under `--latency-budget-ms`
at p99, on the same model) and exported with that budget, so the Triton config is the one torchopt writes by
construction: `max_batch_size` = the finder's batch, `max_queue_delay_microseconds` = budget − 2 × the finder's
p99 at that batch (the batch in flight and the request's own; 0 when negative). Then, each client thread
sending one item after another (closed loop):

- `direct`: the optimized module called on a batch of one under a lock (one call at a time, as a shared model
  is used without a batcher);
- `batcher`: one `DynamicBatcher` (max batch = the export's, delay `--batcher-delay-ms`), called as the blocking
  ``batcher(x)`` (on an idle batcher the caller runs its item itself; under load it queues for a batch);
- `triton`: the bundled `tritonserver` (Python backend) on the exported repository, through tritonclient gRPC,
  one client per thread; `--client-procs` spreads the threads over processes, so that one interpreter's GIL
  (tritonclient serializes each tensor in Python) is not what a fast GPU server is measured by.

Reported per mode and concurrency: requests/s and per-request p50/p99, each the median of `--repeats` runs with
its min-max spread (a spread over 10 % of the median is labelled unstable). Alongside: the in-process
throughput at the finder's batch (`torchopt.profile.latency`, items/s at the median, over the same repeats)
and a loss check: `--requests` requests (default 10,000) from 64 clients through the server, every answer
compared with the eager model. Goals (issue 14), each judged on the measured figures: served throughput at
concurrency 64 >= 80 % of the in-process throughput at the finder's batch; the batcher adds <= 5 % to a direct
call's p50 at concurrency 1; the served p99 within the latency budget; 0 requests lost. The machine's
1-minute load average is sampled at the start, between phases and at the end: above 1.5 the results are
labelled as taken on a busy machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _closed_loop import closed_loops, closed_loops_in_processes
from _results import write_results

import torchopt
from torchopt import Recipe
from torchopt.environment import environment
from torchopt.profile import latency
from torchopt.recipes import AutoBatchConfig, CastConfig, CompileConfig, ValidateConfig
from torchopt.serve import DynamicBatcher, TritonServer, export_triton, smoke_test

RESULTS = Path(__file__).resolve().parent / "results"
CONCURRENCY = (1, 8, 64)
MODES = ("direct", "batcher", "triton")
UNSTABLE_SPREAD_PCT = 10.0
BUSY_LOAD = 1.5  # 1-minute load average above which a 2-core machine is busy with other work
GOAL_SERVED_PCT = 80.0
GOAL_OVERHEAD_PCT = 5.0
LOSS_CONCURRENCY = 64
# The server runs the same module as the eager reference; in float16 the batch a request lands in changes the
# GPU kernels chosen (and their accumulation order) over 12+ layers, so a float16 answer differs by a few ulps.
TOLERANCE = {"float32": {"atol": 1e-5, "rtol": 1e-5}, "float16": {"atol": 5e-2, "rtol": 5e-2}}


# ---------------------------------------------------------------------------------------------------------
# Workloads: (model, input profile, compute dtype)


def cnn_cpu() -> tuple[torch.nn.Module, torchopt.InputSpec, str]:
    """A small CNN on 64x64 images (~1 ms per image on one core): the CPU stand-in for ResNet-50."""

    def block(cin: int, cout: int, stride: int) -> list[torch.nn.Module]:
        conv = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        return [conv, torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]

    torch.manual_seed(0)
    layers = [*block(3, 32, 2), *block(32, 32, 1), *block(32, 64, 2), *block(64, 64, 1), *block(64, 128, 2)]
    model = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 10))
    spec = torchopt.InputSpec("image", min=(1, 3, 64, 64), opt=(8, 3, 64, 64), max=(64, 3, 64, 64))
    return model.eval(), spec, "float32"


def resnet50_fp16() -> tuple[torch.nn.Module, torchopt.InputSpec, str]:
    from torchopt._compat import import_torchvision

    model = import_torchvision().models.resnet50(weights=None).eval()
    spec = torchopt.InputSpec("image", min=(1, 3, 224, 224), opt=(32, 3, 224, 224), max=(256, 3, 224, 224))
    return model, spec, "float16"


class BertBaseEncoder(torch.nn.Module):
    """BERT-base-sized (12 layers, hidden 768, 12 heads, FFN 3072, vocabulary 30522): token ids → [CLS] vector."""

    def __init__(self, vocab: int = 30522, hidden: int = 768, layers: int = 12, seq: int = 128) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, hidden)
        self.positions = torch.nn.Parameter(torch.randn(1, seq, hidden) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(hidden, 12, 4 * hidden, batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(input_ids) + self.positions[:, : input_ids.shape[1]]
        return self.encoder(x)[:, 0]


def bert_base_fp16() -> tuple[torch.nn.Module, torchopt.InputSpec, str]:
    torch.manual_seed(0)
    spec = torchopt.InputSpec(
        "input_ids", dtype="int64", min=(1, 128), opt=(32, 128), max=(256, 128), value_range=(0, 30522)
    )
    return BertBaseEncoder().eval(), spec, "float16"


def encoder_cpu() -> tuple[torch.nn.Module, torchopt.InputSpec, str]:
    """The encoder at 2 layers, 192 wide (12 heads), 32 tokens: the CPU stand-in for the BERT workload (token-id
    inputs)."""
    torch.manual_seed(0)
    spec = torchopt.InputSpec("input_ids", dtype="int64", min=(1, 32), opt=(8, 32), max=(64, 32), value_range=(0, 1000))
    model = BertBaseEncoder(vocab=1000, hidden=192, layers=2, seq=32)
    return model.eval(), spec, "float32"


WORKLOADS: dict[str, Callable[[], tuple[torch.nn.Module, torchopt.InputSpec, str]]] = {
    "cnn_cpu": cnn_cpu,
    "encoder_cpu": encoder_cpu,
    "resnet50_fp16": resnet50_fp16,
    "bert_base_fp16": bert_base_fp16,
}
DEFAULT_WORKLOADS = {"cpu": ["cnn_cpu"], "cuda": ["resnet50_fp16", "bert_base_fp16"]}


def optimize(model: torch.nn.Module, spec: torchopt.InputSpec, dtype: str, device: str, budget_ms: float):
    """The module optimized with the batch finder in the recipe (profile max kept, opt = the finder's batch)."""
    recipe = Recipe(
        [
            CastConfig(dtype=dtype),
            AutoBatchConfig(
                search_max=False, optimal={"latency_budget_ms": budget_ms, "percentile": 99, "progress": False}
            ),
            CompileConfig(backend="eager"),
            ValidateConfig(measure_latency=False),
        ],
        name="bench_serve",
    )
    return torchopt.optimize(model, recipe, inputs=[spec], device=device, progress=False)


def finder_result(fast) -> dict[str, Any]:
    step = next(s for s in fast.report.to_dict()["steps"] if s["step"] == "auto_batch")
    best = step["details"]["optimal_batch"]
    return {k: best[k] for k in ("size", "latency_ms", "throughput", "percentile", "stop_reason", "seconds")}


# ---------------------------------------------------------------------------------------------------------
# Load and measurement helpers


def _own_pids() -> set[int]:
    """This process and its descendants (the server and its Python-backend stubs), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # exited meanwhile
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    own, grew = {os.getpid()}, True
    while grew:
        found = {pid for pid, parent in parents.items() if parent in own} - own
        own |= found
        grew = bool(found)
    return own


def _running_threads(pid: int) -> int:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    running = 0
    for tid in tasks:
        try:
            running += Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
        except OSError:
            continue
    return running


class LoadMonitor:
    """The machine's 1-minute load average at named points, and, sampled every second in a thread, how many
    runnable tasks belong to other processes (the machine's running count minus this bench's own threads:
    the load average counts the bench's 64 client threads and its server too)."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.samples: list[dict[str, Any]] = []
        self.others: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(interval_s,), daemon=True)

    def _watch(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
            own = sum(_running_threads(pid) for pid in _own_pids())
            self.others.append(running - own)  # may go below 0: the two counts are read a moment apart

    def __enter__(self) -> LoadMonitor:
        self.sample("start")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample("end")

    def sample(self, where: str) -> None:
        self.samples.append({"at": where, "load_1min": round(os.getloadavg()[0], 2)})

    def to_dict(self) -> dict[str, Any]:
        others = self.others or [0]
        return {
            "load_average": self.samples,
            "max_load_1min": max(s["load_1min"] for s in self.samples),
            # The median: single samples are off by how many of the bench's threads changed state between
            # reading the machine's count and its own.
            "other_runnable_median": max(0.0, statistics.median(others)),
            "other_runnable_samples": len(self.others),
            "busy": max(s["load_1min"] for s in self.samples) > BUSY_LOAD,
        }


def percentile_ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1e3


def spread(samples: list[float]) -> dict[str, Any]:
    """Median of the repeats with its min-max; unstable when the range exceeds 10 % of the median."""
    med = statistics.median(samples)
    width = (max(samples) - min(samples)) / med * 100 if med else 0.0
    return {"median": med, "min": min(samples), "max": max(samples), "unstable": width > UNSTABLE_SPREAD_PCT}


def item(spec: torchopt.InputSpec, seed: int) -> torch.Tensor:
    """One request's input: batch 1 of the profile's shape (on the CPU, as a client holds it)."""
    return spec.example("min", seed=seed)[:1]


# ---------------------------------------------------------------------------------------------------------
# The three ways of serving one item


def direct_callers(fast, spec, device: str) -> Callable[[int], Callable[[], Any]]:
    lock = threading.Lock()

    def make(k: int) -> Callable[[], Any]:
        x = item(spec, k)

        def call() -> torch.Tensor:
            # no_grad, as the batcher's worker calls the model: the two differ only in how calls are gathered.
            with lock, torch.no_grad():
                return fast(x.to(device)).cpu()  # the answer back on the CPU, as a server returns it

        return call

    return make


def batcher_callers(batcher: DynamicBatcher, spec, device: str) -> Callable[[int], Callable[[], Any]]:
    def make(k: int) -> Callable[[], Any]:
        x = item(spec, k)[0]
        return lambda: batcher(x.to(device)).cpu()

    return make


def triton_callers(grpc_url: str, model: str, spec) -> Callable[[int], Callable[[], Any]]:
    """Callers through tritonclient gRPC, one client per thread; module-level with plain arguments, so that client
    processes can build their own (`--client-procs`)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    def make(k: int) -> Callable[[], Any]:
        client = grpcclient.InferenceServerClient(grpc_url)
        arr = item(spec, k).numpy()
        inp = grpcclient.InferInput(spec.name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        return lambda: client.infer(model, [inp], client_timeout=60).as_numpy("output")

    return make


def measure(make_caller, clients: int, requests: int, repeats: int, procs: int = 1) -> dict[str, Any]:
    """`repeats` closed-loop runs after one short warm-up run, by the same client threads; throughput and p50/p99
    with their spread. With `procs` > 1, `make_caller` is ``(factory, args)`` and the threads are spread over
    that many processes."""
    requests = max(requests, 8 * clients)  # every client sends at least 8 requests
    plan = [max(clients, requests // 10)] + [requests] * repeats
    if procs > 1:
        runs = closed_loops_in_processes(min(procs, clients), clients, plan, *make_caller)[1:]
    else:
        runs = closed_loops(clients, plan, make_caller)[1:]
    return {
        "concurrency": clients,
        "requests_per_run": requests,
        "throughput_per_s": spread([r["requests_per_s"] for r in runs]),
        "p50_ms": spread([percentile_ms(r["latencies_s"], 50) for r in runs]),
        "p99_ms": spread([percentile_ms(r["latencies_s"], 99) for r in runs]),
    }


def in_process_at(fast, spec, size: int, device: str, repeats: int) -> dict[str, Any]:
    """Items/s of the optimized module at batch `size` (size / median latency), over `repeats` timings."""
    x = torch.cat([item(spec, seed) for seed in range(size)]).to(device)
    rates = []
    for _ in range(repeats):
        res = latency(fast, x, warmup=5, iters=100, max_time_s=3.0, batch_size=size)
        rates.append(size * 1000.0 / res.p50_ms)
    return {"batch": size, "items_per_s": spread(rates)}


def loss_check(server: TritonServer, model: str, eager: torch.nn.Module, spec, dtype: str, device: str, n: int):
    """`n` requests from 64 clients through the server; every answer compared with the eager model."""

    def reference(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            x = inputs[spec.name].to(device)
            x = x.to(getattr(torch, dtype)) if x.is_floating_point() else x
            return {"output": eager(x).float().cpu()}

    res = smoke_test(
        server,
        model,
        make_inputs=lambda i: {spec.name: item(spec, 1_000_000 + i)},
        reference=reference,
        requests=n,
        concurrency=LOSS_CONCURRENCY,
        **TOLERANCE[dtype],
    )
    return {
        "requests": n,
        "concurrency": LOSS_CONCURRENCY,
        "answered": res.answered,
        "lost": n - res.answered,
        "mismatched": len(res.mismatches),
        "first_problems": res.mismatches[:5],
        "tolerance": TOLERANCE[dtype],
        "server_batch_sizes": res.batch_sizes,
        "seconds": res.seconds,
    }


# ---------------------------------------------------------------------------------------------------------
# One workload, goals


def bench_workload(name: str, args: argparse.Namespace, load: LoadMonitor) -> dict[str, Any]:
    eager, spec, dtype = WORKLOADS[name]()
    print(
        f"[{name}] optimizing (auto_batch: find_optimal_batch, p99 <= {args.latency_budget_ms} ms) ...", file=sys.stderr
    )
    fast = optimize(eager, spec, dtype, args.device, args.latency_budget_ms)
    spec = fast.profiles[0][0]  # the profile auto_batch set (opt = the finder's batch)
    eager = eager.to(args.device, getattr(torch, dtype))
    finder = finder_result(fast)
    in_process = in_process_at(fast, spec, finder["size"], args.device, args.repeats)
    top = max(CONCURRENCY)  # a closed loop of `top` clients never queues more than `top` requests
    in_process_top = in_process_at(fast, spec, top, args.device, args.repeats) if finder["size"] > top else None
    load.sample(f"{name}: optimized")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="torchopt-bench-serve-") as work:
        export = export_triton(
            fast,
            Path(work) / "repo",
            name=name,
            latency_budget_ms=args.latency_budget_ms,
            threads=args.threads,
            instance_count=args.instances,
        )
        print(
            f"[{name}] exported: max_batch_size {export.max_batch_size}, queue delay {export.queue_delay_us} µs",
            file=sys.stderr,
        )
        for clients in CONCURRENCY:
            rows.append(
                {
                    "mode": "direct",
                    **measure(direct_callers(fast, spec, args.device), clients, args.run_requests, args.repeats),
                }
            )
            with DynamicBatcher(fast, max_batch=export.max_batch_size, max_delay_ms=args.batcher_delay_ms) as batcher:
                rows.append(
                    {
                        "mode": "batcher",
                        **measure(
                            batcher_callers(batcher, spec, args.device), clients, args.run_requests, args.repeats
                        ),
                    }
                )
        load.sample(f"{name}: in-process modes measured")
        with TritonServer(export.repo, exit_timeout_s=2) as server:
            server_version = server.client().get_server_metadata(as_json=True).get("version")
            for clients in CONCURRENCY:
                print(f"[{name}] triton, concurrency {clients} ...", file=sys.stderr)
                rows.append(
                    {
                        "mode": "triton",
                        **measure(
                            (triton_callers, (server.grpc_url, name, spec))
                            if args.client_procs > 1
                            else triton_callers(server.grpc_url, name, spec),
                            clients,
                            args.run_requests,
                            args.repeats,
                            procs=args.client_procs,
                        ),
                    }
                )
            load.sample(f"{name}: served modes measured")
            print(f"[{name}] loss check: {args.requests} requests ...", file=sys.stderr)
            loss = loss_check(server, name, eager, spec, dtype, args.device, args.requests)
            startup_s = server.startup_seconds
        load.sample(f"{name}: loss check done")
    rows.sort(key=lambda r: (r["concurrency"], MODES.index(r["mode"])))
    res = {
        "workload": name,
        "input": spec.to_dict(),
        "dtype": dtype,
        "latency_budget_ms": args.latency_budget_ms,
        "finder": finder,
        "export": {
            "max_batch_size": export.max_batch_size,
            "queue_delay_us": export.queue_delay_us,
            "queue_delay_reason": export.queue_delay_reason,
        },
        "tritonserver": server_version,
        "server_startup_s": startup_s,
        "in_process_at_optimal": in_process,
        "in_process_at_concurrency": in_process_top,
        "rows": rows,
        "loss_check": loss,
    }
    res["goals"] = goals(res)
    return res


def _row(res: dict[str, Any], mode: str, clients: int) -> dict[str, Any]:
    return next(r for r in res["rows"] if r["mode"] == mode and r["concurrency"] == clients)


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of issue 14 with its measured figure and verdict."""
    served = _row(res, "triton", 64)["throughput_per_s"]["median"]
    reference = res["in_process_at_optimal"]["items_per_s"]["median"]
    served_pct = 100.0 * served / reference
    direct_p50 = _row(res, "direct", 1)["p50_ms"]["median"]
    overhead = 100.0 * (_row(res, "batcher", 1)["p50_ms"]["median"] / direct_p50 - 1)
    budget = res["latency_budget_ms"]
    p99 = {c: _row(res, "triton", c)["p99_ms"]["median"] for c in CONCURRENCY}
    loss = res["loss_check"]
    batch = res["in_process_at_optimal"]["batch"]
    return [
        {
            "goal": f"served throughput at concurrency 64 >= {GOAL_SERVED_PCT:g} % of in-process at the finder's"
            f" batch ({batch})",
            "measured": f"{served:,.0f} / {reference:,.0f} requests/s = {served_pct:.1f} %",
            "met": served_pct >= GOAL_SERVED_PCT,
        },
        {
            "goal": f"batcher adds <= {GOAL_OVERHEAD_PCT:g} % to a direct call at concurrency 1 (p50)",
            "measured": f"{overhead:+.1f} %",
            "met": overhead <= GOAL_OVERHEAD_PCT,
        },
        *(
            {
                "goal": f"served p99 at concurrency {c} within the export's latency budget ({budget:g} ms)",
                "measured": f"{p99[c]:.2f} ms",
                "met": p99[c] <= budget,
            }
            for c in CONCURRENCY
        ),
        {
            "goal": f"0 requests lost of {loss['requests']:,} (every answer equal to eager within tolerance)",
            "measured": f"{loss['lost']} lost, {loss['mismatched'] - loss['lost']} wrong answers",
            "met": loss["lost"] == 0 and loss["mismatched"] == 0,
        },
    ]


# ---------------------------------------------------------------------------------------------------------
# Report


def versions() -> dict[str, str | None]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"tritonclient": version("tritonclient"), "nvidia-pytriton": version("nvidia-pytriton")}


def _cell(s: dict[str, Any], fmt: str = ".4g") -> str:
    mark = " (unstable)" if s["unstable"] else ""
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}–{s['max']:{fmt}}]{mark}"


def workload_markdown(w: dict[str, Any]) -> list[str]:
    f, e, ip, loss = w["finder"], w["export"], w["in_process_at_optimal"], w["loss_check"]
    lines = [
        f"## {w['workload']} ({w['dtype']}, input {w['input']['name']} {tuple(w['input']['opt'][1:])})",
        "",
        f"Batch finder (auto_batch, p{f['percentile']:g} <= {w['latency_budget_ms']:g} ms): batch {f['size']},"
        f" p{f['percentile']:g} {f['latency_ms']:.2f} ms, {f['throughput']:,.0f} items/s (stopped: {f['stop_reason']})."
        f" Export: max_batch_size {e['max_batch_size']}, max_queue_delay_microseconds {e['queue_delay_us']}"
        f" ({e['queue_delay_reason']}). In-process at batch {ip['batch']}: {_cell(ip['items_per_s'], ',.0f')} items/s."
        f" tritonserver {w['tritonserver']} ready in {w['server_startup_s']:.1f} s.",
        "",
        "| mode | concurrency | requests/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for r in w["rows"]:
        lines.append(
            f"| {r['mode']} | {r['concurrency']} | {_cell(r['throughput_per_s'], ',.0f')} | {_cell(r['p50_ms'], '.3g')}"
            f" | {_cell(r['p99_ms'], '.3g')} |"
        )
    batches = ", ".join(f"{b}×{n}" for b, n in loss["server_batch_sizes"].items())
    lines += [
        "",
        f"Loss check: {loss['answered']:,}/{loss['requests']:,} answered from {loss['concurrency']} clients,"
        f" {loss['mismatched']} problems (tolerance atol {loss['tolerance']['atol']:g}, rtol"
        f" {loss['tolerance']['rtol']:g}) in {loss['seconds']:.1f} s; server batches (size×count): {batches}.",
        "",
        "Goals:",
        "",
        *(f"- {'met' if g['met'] else 'NOT met'}: {g['goal']}: {g['measured']}" for g in w["goals"]),
        "",
        *latency_notes(w),
    ]
    return lines


def latency_notes(w: dict[str, Any]) -> list[str]:
    """Where the served latency comes from, computed from this workload's figures."""
    budget, delay_ms = w["latency_budget_ms"], w["export"]["queue_delay_us"] / 1000
    served64 = _row(w, "triton", 64)["throughput_per_s"]["median"]
    p50_1, direct_1 = _row(w, "triton", 1)["p50_ms"]["median"], _row(w, "direct", 1)["p50_ms"]["median"]
    return [
        f"- At concurrency 1 a request waits at most the queue delay ({delay_ms:.2f} ms) for company: served p50"
        f" {p50_1:.2f} ms is the call plus the server's round trip on top of that wait (a direct call takes"
        f" {direct_1:.2f} ms). The export derives the delay as the budget minus two full batches' p99 (the one in"
        " flight and the request's own), 0 when negative; the round trip itself is not in the budget.",
        f"- At concurrency 64 a closed loop keeps 64 requests in flight, so the mean latency is 64 / throughput"
        f" (Little's law): {64_000 / served64:.1f} ms at the measured {served64:,.0f} requests/s; a p99 within"
        f" {budget:g} ms there needs more than {64_000 / budget:,.0f} requests/s.",
        *_reachable_note(w, served64),
        "",
    ]


def _reachable_note(w: dict[str, Any], served64: float) -> list[str]:
    """When the finder's batch exceeds 64, what concurrency 64 can reach at most: in-process at batch 64."""
    top = w.get("in_process_at_concurrency")
    if not top:
        return []
    rate = top["items_per_s"]["median"]
    return [
        f"- The finder's batch ({w['finder']['size']}) is above 64, which 64 closed-loop clients can never queue:"
        f" in-process at batch {top['batch']} is {_cell(top['items_per_s'], ',.0f')} items/s, and the served"
        f" {served64:,.0f} requests/s at concurrency 64 are {100 * served64 / rate:.1f} % of that."
    ]


def markdown(res: dict[str, Any]) -> str:
    env, v = res["environment"], res["versions"]
    where = env.get("gpu") or f"CPU ({env['cpu_count']} cores, {env['cpu']})"
    load = res["load"]
    loads = ", ".join(f"{s['load_1min']:g} ({s['at']})" for s in load["load_average"])
    lines = [
        "# bench_serve: direct calls, DynamicBatcher and the Triton server, side by side",
        "",
        f"{env['date']} · {where} · device {res['device']} · torch {env['torch']} · Python {env['python']} ·"
        f" tritonserver {res['workloads'][0]['tritonserver'] if res['workloads'] else '?'} (nvidia-pytriton"
        f" {v['nvidia-pytriton']}) · tritonclient {v['tritonclient']} · {res['seconds']:.0f} s.",
        "",
        f"Median of {res['repeats']} closed-loop runs [min–max] per cell, >= {res['run_requests']} requests per run;"
        f" torch threads {res['threads']} in-process and per server instance, {res.get('instances', 1)} server"
        f" instance(s), Triton clients in {res.get('client_procs', 1)} process(es); batcher max_delay_ms"
        f" {res['batcher_delay_ms']:g}. 1-minute load average: {loads}. Runnable tasks of other processes"
        f" (sampled every second: the machine's running count minus this bench's threads and server; an"
        f" estimate): median {load['other_runnable_median']:g} on {env['cpu_count']} cores.",
        "",
    ]
    if load["busy"]:
        lines += [
            f"**Taken on a busy machine**: the 1-minute load average reached {load['max_load_1min']:g} (above"
            f" {BUSY_LOAD:g}) during the run. It counts this bench's own threads (up to 64 clients and the server);"
            f" other processes kept a median {load['other_runnable_median']:g} tasks runnable, so the figures,"
            " the served ones most, are lower and noisier than on an idle machine.",
            "",
        ]
    for w in res["workloads"]:
        lines += workload_markdown(w)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=None, help="default: by device")
    ap.add_argument("--latency-budget-ms", type=float, default=20.0, help="p99 budget of the finder and export")
    ap.add_argument("--requests", type=int, default=10_000, help="requests of the loss check")
    ap.add_argument("--run-requests", type=int, default=1000, help="requests per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batcher-delay-ms", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in-process and per server instance")
    ap.add_argument("--instances", type=int, default=1, help="server model instances (Triton instance_group count)")
    ap.add_argument(
        "--client-procs",
        type=int,
        default=1,
        help="processes the Triton clients' threads are spread over (one interpreter's GIL caps a Python client)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_serve --device cuda needs a CUDA GPU (none here); nothing was measured", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    env = environment()  # the date is the run's start
    t0 = time.perf_counter()
    workloads: list[dict[str, Any]] = []
    stem = f"bench_serve_{args.device}" + (f"_instances{args.instances}" if args.instances > 1 else "")

    def save() -> None:
        res = run_record(args, env, load, time.perf_counter() - t0, workloads)
        write_results(res, markdown(res), args.out, stem)

    with LoadMonitor() as load:
        for workload in args.workloads or DEFAULT_WORKLOADS[args.device]:
            workloads.append(bench_workload(workload, args, load))
            save()  # after every workload, so a run cut short by a time limit keeps what it measured
    save()  # with the load monitor's end sample
    return 0


def run_record(args: argparse.Namespace, env, load, seconds: float, workloads: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "environment": env,
        "versions": versions(),
        "device": args.device,
        "repeats": args.repeats,
        "run_requests": args.run_requests,
        "threads": args.threads,
        "instances": args.instances,
        "client_procs": args.client_procs,
        "batcher_delay_ms": args.batcher_delay_ms,
        "load": load.to_dict(),
        "seconds": seconds,
        "workloads": workloads,
    }


if __name__ == "__main__":
    sys.exit(main())
