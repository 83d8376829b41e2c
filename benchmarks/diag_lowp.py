"""Why a deployed FP8 / INT8 encoder is not faster than fp16 (issue 15): each variant alone (one compiled instance
per dynamo cache), eager and compiled, CUDA-event medians, the graphs dynamo built, and the top CUDA kernels of the
compiled fp16 model and of each deployed one (torch.profiler), to set kernel against kernel. Run on a GPU:

    python benchmarks/diag_lowp.py --modes fp8 "fp8 fast-accum" --calib-on-cpu
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from bench_lowp import FAST_ACCUM, Encoder, quantized, with_fast_accum
from torch._dynamo.utils import counters

import torchopt.quantize as tq


def median_ms(fn, x, iters=30):
    for _ in range(5):
        fn(x)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def compiled_ms(module, x, mode="default"):
    torch._dynamo.reset()
    counters.clear()
    ms = median_ms(torch.compile(module, mode=mode), x)
    breaks = {str(k)[:120]: v for k, v in counters["graph_break"].items()}
    return ms, f"{int(counters['stats']['unique_graphs'])} graphs, graph breaks {breaks or 'none'}"


def top_kernels(module, x, n=16):
    """The CUDA kernels of 5 compiled calls (no CUDA graphs: each kernel is seen), the most time first."""
    compiled = torch.compile(module)
    for _ in range(3):
        compiled(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            compiled(x)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=70)


def deployed_variant(model, x, mode, calib_on_cpu):
    """The deployed model of `mode`, or of fp8 with fast accumulation for bench_lowp's "fp8 fast-accum"."""
    base = "fp8" if mode == FAST_ACCUM else mode
    fmt = next(f for f, spec in tq.FORMATS.items() if base in spec.lowp_modes)  # the first that deploys it
    deployed = tq.deploy(quantized(model, x, fmt, calib_on_cpu), base).to(x.device)
    return with_fast_accum(deployed) if mode == FAST_ACCUM else deployed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", nargs="+", default=["fp8", "int8"], help=f"deploy modes, or {FAST_ACCUM!r}")
    parser.add_argument("--calib-on-cpu", action="store_true", help="as bench_lowp's: no ModelOpt CUDA extension")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Encoder().eval().cuda()
    x = torch.randn(64, 128, 768, device="cuda")
    fp16 = copy.deepcopy(model).half()
    with torch.no_grad():
        print(f"fp16 eager {median_ms(fp16, x.half()):.3f} ms")
        ms, graphs = compiled_ms(fp16, x.half())
        print(f"fp16 compiled {ms:.3f} ms, {graphs}")
        print(f"fp16 compiled with CUDA graphs {compiled_ms(fp16, x.half(), 'reduce-overhead')[0]:.3f} ms")
        torch._dynamo.reset()
        print(top_kernels(fp16, x.half()))
        for mode in args.modes:
            deployed = deployed_variant(model, x, mode, args.calib_on_cpu)
            print(f"{mode} eager {median_ms(deployed, x.half()):.3f} ms")
            ms, graphs = compiled_ms(deployed, x.half())
            print(f"{mode} compiled {ms:.3f} ms, {graphs}")
            print(f"{mode} compiled with CUDA graphs {compiled_ms(deployed, x.half(), 'reduce-overhead')[0]:.3f} ms")
            torch._dynamo.reset()
            print(top_kernels(deployed, x.half()))


if __name__ == "__main__":
    main()
