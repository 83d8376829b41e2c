"""Fused preprocessing kernel benchmark (issue 7): eager chain, torch.compile of the same chain, and
`torchopt.kernels.preprocess`, side by side on one GPU, against the memory-bandwidth floor.

* eager: `_reference_chain`, the torch ops `preprocess_ref` runs (permute, float, F.interpolate, normalize,
  crop/pad, cast), imported, not copied; compiled: ``torch.compile`` of that same function;
* ours: `preprocess` with a preallocated ``out=`` (the hot-loop usage);
* floor: bytes the op must move (output + the source bytes it touches, counted in 32-byte sectors from the
  same index math as the kernel: a bilinear 1080p -> 224 reads 448 of 1080 rows) / the device copy
  bandwidth measured in this run (``dst.copy_(src)`` of 512 MB);
* same-bytes copy: a device copy moving exactly the floor's bytes (half read, half written), timed like the
  kernels. do_bench flushes L2 by writing 256 MB, so every timed call starts by evicting ~50 MB of dirty lines,
  which costs a 92 MB op far more than the 1 GB copy the bandwidth comes from: a target below this time is
  below what the device does for a plain copy of the same bytes under the same timing
  (`benchmarks/diag_preprocess_floor.py` measures more: an ideal-access kernel, a clean L2, tiles).

GPU times are `triton.testing.do_bench(return_mode="median")` (L2 flushed before each call, so host launch
overhead is hidden behind the flush); the batch-1 case also reports host wall time per call over a loop,
which is what "<= 8 us per call" measures, directly and through `CapturedPreprocess` (a CUDA graph of the
call). Each case checks ours against the eager chain before timing.

The host-pipeline case of issue 7 (pageable 1080p frames -> fp16 batches vs pinned H2D bandwidth) is
`benchmarks/bench_feeder.py`.

Run (CUDA required, ~3-5 minutes on an H100, mostly torch.compile)::

    python benchmarks/bench_preprocess.py                  # writes benchmarks/results/preprocess_<date>.{json,md}
    python benchmarks/bench_preprocess.py --cases b1 list  # a subset
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchopt.environment import environment
from torchopt.kernels import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CapturedPreprocess,
    PreprocessConfig,
    preprocess,
    preprocess_params,
)

PP = importlib.import_module("torchopt.kernels.preprocess_op")  # for _reference_chain / _chain_kwargs
RESULTS = Path(__file__).resolve().parent / "results"
SECTOR = 32  # bytes: the DRAM/L2 access granularity the floor counts in


@dataclass
class Case:
    name: str
    frames: list[tuple[int, int]]  # source (H, W) per image; a batch repeats one size
    size: tuple[int, int]
    options: dict[str, Any]
    as_list: bool = False  # one list of differently sized images instead of a batch tensor
    targets: dict[str, float] = field(default_factory=dict)  # min speedup vs compile, max x floor, max us
    note: str = ""


NORM = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
FP16 = {"dtype": torch.float16, **NORM}
LIST_SIZES = [(1080, 1920), (720, 1280), (1440, 2560), (1920, 1080), (900, 1600), (1080, 1440), (480, 640),
              (2160, 3840)]  # fmt: skip
CASES = {
    "1080p_b32": Case("1080p->224 b32 fp16 NCHW", [(1080, 1920)] * 32, (224, 224), FP16,
                      targets={"vs_compile": 1.33, "vs_floor": 1.25}),
    "480p_b64": Case("480p->224 b64 fp16", [(480, 640)] * 64, (224, 224), FP16, targets={"vs_compile": 1.2}),
    "4k_letterbox_b8": Case("4K->640 letterbox b8 fp16", [(2160, 3840)] * 8, (640, 640),
                            {"fit": "letterbox", **FP16}, targets={"vs_compile": 1.2, "max_us": 55.0}),
    "norm_b256": Case("224->224 normalize+layout b256 fp16", [(224, 224)] * 256, (224, 224), FP16,
                      targets={"vs_compile": 2.0}),
    "b1": Case("1080p->224 b1 fp16", [(1080, 1920)], (224, 224), FP16, targets={"max_wall_us": 8.0},
               note="launch-bound: host wall time per call is the metric"),
    "list8": Case("list of 8 sizes ->224 fp16 (one launch)", LIST_SIZES, (224, 224), FP16, as_list=True,
                  note="ratio vs the batch of 8 x 1080p; floor counts each frame's own bytes"),
    "list8_batch": Case("batch of 8 x 1080p ->224 fp16 (list reference)", [(1080, 1920)] * 8, (224, 224), FP16),
    "nv12_b8": Case("NV12 1080p->640 b8 fp16", [(1080, 1920)] * 8, (640, 640), {"format": "nv12", **FP16}),
}  # fmt: skip


# ------------------------------------------------------------------------------------------- bytes floor


def _linear_rows(n_in: int, n_out: int) -> torch.Tensor:
    """Source indices a bilinear resize n_in -> n_out reads (the kernel's / PyTorch's index math)."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    s = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = s.to(torch.int64).clamp(max=n_in - 1)
    return torch.unique(torch.cat([i0, (i0 + 1).clamp(max=n_in - 1)]))


def _sectors(cols: torch.Tensor, bytes_per_px: int) -> int:
    """32-byte sectors holding the given pixel columns of one row (rows start sector-aligned)."""
    first = cols * bytes_per_px // SECTOR
    last = (cols * bytes_per_px + bytes_per_px - 1) // SECTOR
    return int(torch.unique(torch.cat([first, last])).numel())


def touched_bytes(case: Case, cfg: PreprocessConfig) -> tuple[int, int]:
    """(bytes read, bytes written) that `case` cannot avoid: every sector holding a sampled pixel, once.

    Bilinear taps (nearest and antialias cases are not in the table); stretch and letterbox sample the whole
    resized image (a center crop would sample less: not modeled).
    """
    oh, ow = case.size
    written = len(case.frames) * 3 * oh * ow * cfg.torch_dtype.itemsize
    read = 0
    for H, W in case.frames:
        p = preprocess_params((H, W), case.size, config=cfg)
        nh, nw = p.resized_size
        if (nh, nw) == (H, W):
            rows, cols = torch.arange(H), torch.arange(W)
        else:
            rows, cols = _linear_rows(H, nh), _linear_rows(W, nw)
        if cfg.is_yuv:  # luma 1 byte per pixel; chroma rows (y // 2) with 2-byte UV pairs at x // 2
            read += len(rows) * _sectors(cols, 1)
            read += len(torch.unique(rows // 2)) * _sectors(torch.unique(cols // 2), 2)
        else:
            read += len(rows) * _sectors(cols, 3)
    return read * SECTOR, written


# ------------------------------------------------------------------------------------------------ timing


def _do_bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3  # us


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (read + write bytes / time) of 512 MB."""
    src = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = _do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (us * 1e-6) / 1e9


def same_bytes_copy_us(nbytes: int) -> float:
    """do_bench time of a device copy moving `nbytes` in all (nbytes / 2 read, nbytes / 2 written)."""
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return _do_bench(lambda: dst.copy_(src))


def _make_inputs(case: Case, cfg: PreprocessConfig, gen: torch.Generator):
    def frame(H: int, W: int) -> torch.Tensor:
        shape = (H * 3 // 2, W) if cfg.is_yuv else (H, W, 3)
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen, device="cuda")

    if case.as_list:
        return [frame(H, W) for H, W in case.frames]
    H, W = case.frames[0]
    shape = (len(case.frames), H * 3 // 2, W) if cfg.is_yuv else (len(case.frames), H, W, 3)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen, device="cuda")


def _chain(cfg: PreprocessConfig, hw: tuple[int, int], size: tuple[int, int]):
    kwargs = PP._chain_kwargs(cfg, hw, size, torch.device("cuda"))
    return lambda x: PP._reference_chain(x, **kwargs)


def wall_us_per_call(fn, calls: int = 2000) -> float:
    """Host wall time per call over a loop, synchronized at the end (launch overhead + GPU time)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def graph_replay_us(x: torch.Tensor, size, cfg: PreprocessConfig, calls: int = 2000) -> float | str:
    """Wall time per call of `CapturedPreprocess` (the documented batch-1 route: a CUDA graph of the call)."""
    try:
        captured = CapturedPreprocess(x, size, config=cfg)
    except Exception as exc:  # report, do not abort the run
        return f"capture failed: {type(exc).__name__}: {exc}"
    return wall_us_per_call(captured, calls)


def run_case(key: str, case: Case, bw_gbs: float, compile_chain: bool) -> dict[str, Any]:
    cfg = PreprocessConfig(**case.options)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = _make_inputs(case, cfg, gen)
    out = preprocess(x, case.size, config=cfg)  # builds the launch plan; also the output buffer
    res: dict[str, Any] = {"case": case.name, "key": key, "note": case.note, "targets": case.targets}

    if case.as_list:
        chains = [_chain(cfg, hw, case.size) for hw in case.frames]
        eager = lambda: torch.cat([f(t.unsqueeze(0)) for f, t in zip(chains, x, strict=True)])
    else:
        chain = _chain(cfg, case.frames[0], case.size)
        eager = lambda: chain(x)
    ref = eager()
    res["max_abs_err_vs_eager"] = float((out.float() - ref.float()).abs().max())
    res["ours_us"] = _do_bench(lambda: preprocess(x, case.size, config=cfg, out=out))
    res["eager_us"] = _do_bench(eager)
    if compile_chain and not case.as_list:
        fn = torch.compile(_chain(cfg, case.frames[0], case.size), dynamic=False)
        t0 = time.perf_counter()
        fn(x)
        res["compile_s"] = round(time.perf_counter() - t0, 1)
        res["compiled_us"] = _do_bench(lambda: fn(x))
        res["speedup_vs_compile"] = res["compiled_us"] / res["ours_us"]
        if key == "b1":
            res["compiled_wall_us"] = wall_us_per_call(lambda: fn(x), 500)
    read, written = touched_bytes(case, cfg)
    res["bytes_read_mb"], res["bytes_written_mb"] = read / 1e6, written / 1e6
    res["floor_us"] = (read + written) / (bw_gbs * 1e9) * 1e6
    res["x_floor"] = res["ours_us"] / res["floor_us"]
    res["same_bytes_copy_us"] = same_bytes_copy_us(read + written)
    res["x_same_bytes_copy"] = res["ours_us"] / res["same_bytes_copy_us"]
    res["speedup_vs_eager"] = res["eager_us"] / res["ours_us"]
    if key == "b1":
        call = lambda: preprocess(x, case.size, config=cfg, out=out)
        res["ours_wall_us"] = wall_us_per_call(call)
        triton_kernels = importlib.import_module("torchopt.kernels._preprocess_triton")
        triton_kernels.FAST_LAUNCH = False  # every launch through JITFunction.run, as before the bound launcher
        res["ours_wall_jit_run_us"] = wall_us_per_call(call)
        triton_kernels.FAST_LAUNCH = True
        res["ours_graph_replay_us"] = graph_replay_us(x, case.size, cfg)
    res["target_us"] = _target_times(res, case.targets)
    res["pass"] = _check_targets(res, case.targets)
    return res


def _target_times(res: dict[str, Any], targets: dict[str, float]) -> dict[str, float]:
    """The kernel time each throughput target asks for (to compare with the same-bytes copy)."""
    times = {}
    if "vs_compile" in targets and "compiled_us" in res:
        times["vs_compile"] = res["compiled_us"] / targets["vs_compile"]
    if "vs_floor" in targets:
        times["vs_floor"] = res["floor_us"] * targets["vs_floor"]
    if "max_us" in targets:
        times["max_us"] = targets["max_us"]
    return times


def _check_targets(res: dict[str, Any], targets: dict[str, float]) -> dict[str, bool]:
    """Each target met or not: the kernel-time targets against `res["target_us"]`, the batch-1 host wall."""
    checks = {name: res["ours_us"] <= want for name, want in res["target_us"].items()}
    if "max_wall_us" in targets and "ours_wall_us" in res:
        # Met by either route the issue names: a thin direct call, or the replay of a captured graph.
        routes = [res["ours_wall_us"], res.get("ours_graph_replay_us")]
        checks["max_wall_us"] = min(v for v in routes if isinstance(v, float)) <= targets["max_wall_us"]
    return checks


# ------------------------------------------------------------------------------------------------ report


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else (format(v, spec) if isinstance(v, (int, float)) else str(v))


def to_markdown(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [
        "# Fused preprocessing benchmark",
        "",
        f"{env.get('gpu')} · torch {env.get('torch')} · triton {env.get('triton')} · CUDA {env.get('cuda')} ·"
        f" {env.get('date')}",
        "",
        f"Device copy bandwidth: {result['copy_bandwidth_gbs']:.0f} GB/s (floor = bytes touched / this).",
        "",
        "| case | eager µs | compile µs | ours µs | vs compile | floor µs | ours / floor | same-bytes copy µs |"
        " ours / copy | max err | targets |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["cases"]:
        ok = ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in r["pass"].items()) or "-"
        lines.append(
            f"| {r['case']} | {_fmt(r['eager_us'])} | {_fmt(r.get('compiled_us'))} | {_fmt(r['ours_us'])} |"
            f" {_fmt(r.get('speedup_vs_compile'), '.2f')}x | {_fmt(r['floor_us'])} | {_fmt(r['x_floor'], '.2f')}x |"
            f" {_fmt(r.get('same_bytes_copy_us'))} | {_fmt(r.get('x_same_bytes_copy'), '.2f')}x |"
            f" {_fmt(r['max_abs_err_vs_eager'], '.1e')} | {ok} |"
        )
    extra = result.get("derived", {})
    lines += ["", *[f"- {k}: {v}" for k, v in extra.items()]]
    for r in result["cases"]:
        for name, passed in r["pass"].items():
            want, copy = r.get("target_us", {}).get(name), r.get("same_bytes_copy_us")
            if not passed and want is not None and copy is not None:
                where = "below" if want < copy else "above"
                lines.append(
                    f"- {r['case']}: {name} asks for <= {want:.1f} µs, {where} the {copy:.1f} µs a device copy of"
                    f" the same bytes takes under the same timing (ours: {r['ours_us']:.1f} µs)"
                )
    for r in result["cases"]:
        if "ours_wall_us" in r:
            replay = r["ours_graph_replay_us"]
            replay = f"{replay:.1f} µs" if isinstance(replay, float) else replay
            lines.append(
                f"- {r['case']}: host wall per call {r['ours_wall_us']:.1f} µs with the bound launcher"
                f" ({_fmt(r.get('ours_wall_jit_run_us'))} µs through JITFunction.run; compiled"
                f" {_fmt(r.get('compiled_wall_us'))} µs); `CapturedPreprocess` (CUDA graph) replay: {replay}"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (faster, no baseline)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_preprocess needs a CUDA GPU (it times the Triton kernel against torch.compile)")

    bw = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}: device copy {bw:.0f} GB/s", flush=True)
    cases = []
    for key in args.cases:
        r = run_case(key, CASES[key], bw, compile_chain=not args.no_compile)
        cases.append(r)
        print(
            f"{r['case']:<48} eager {r['eager_us']:8.1f} us  compile {_fmt(r.get('compiled_us')):>8} us  ours"
            f" {r['ours_us']:7.1f} us  floor {r['floor_us']:6.1f} us  ({r['x_floor']:.2f}x)  {r['pass']}",
            flush=True,
        )
    derived = {}
    by_key = {r["key"]: r for r in cases}
    if "list8" in by_key and "list8_batch" in by_key:
        a, b = by_key["list8"], by_key["list8_batch"]
        derived["list of 8 / batch of 8 (time)"] = f"{a['ours_us'] / b['ours_us']:.2f}x"
        derived["list of 8 / batch of 8 (time per floor byte)"] = f"{a['x_floor'] / b['x_floor']:.2f}x (target 1.2)"
    result = {"env": environment(), "copy_bandwidth_gbs": bw, "cases": cases, "derived": derived}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"preprocess_{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    stem.with_suffix(".md").write_text(to_markdown(result))
    print(f"wrote {stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
