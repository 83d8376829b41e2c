"""How close can 1080p -> 224 b32 (issue 7's first case) get? Measured floors next to ours and torch.compile.

The benchmark's floor divides the bytes the resize must touch (82.6 MB of source rows + 9.6 MB of fp16 output)
by the bandwidth of a 1 GB copy. This script measures what the device actually does with those bytes:

* ideal rows: a kernel that reads exactly the touched source rows, whole and coalesced (32-bit words), and
  writes the output's bytes: the best access pattern for this op, no resampling work;
* same-bytes copy: ``dst.copy_(src)`` moving the same 92 MB;
* ours (`torchopt.kernels.preprocess`, its tile and the alternatives) and ``torch.compile`` of the eager chain;

each under three L2 states before every timed call: "dirty" (256 MB written, what triton's do_bench does, so
the call first evicts ~50 MB of dirty lines), "clean" (the same, then 64 MB read: clean lines) and "none"
(back to back; host launch time shows there). Median of 200 calls, CUDA events.

Run (CUDA, ~1 minute): ``python benchmarks/diag_preprocess_floor.py`` -> results/logs/preprocess_floor_<gpu>.json
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_preprocess as bench  # noqa: E402

from torchopt.environment import environment  # noqa: E402
from torchopt.kernels import PreprocessConfig, preprocess  # noqa: E402

PP = importlib.import_module("torchopt.kernels.preprocess_op")
KERNELS = importlib.import_module("torchopt.kernels._preprocess_triton")
LOGS = Path(__file__).resolve().parent / "results" / "logs"
TILES = [(2, 128, 2), (1, 128, 4), (1, 256, 4), (1, 256, 8), (1, 64, 2), (1, 128, 2), (2, 256, 4), (4, 64, 2)]


@triton.jit
def _ideal_rows_kernel(src, out, rows_ptr, H, W3, OH, OW, BLOCK: tl.constexpr, OUT_BLOCK: tl.constexpr):
    """One program per (output row, image): reads its source rows y0 and y1 whole, writes 3 x OW fp16.

    Each thread reads BLOCK / OUT_BLOCK consecutive words of both rows (rows start 16-byte aligned, so the
    loads can be vectorized) and folds them into its own output value: no cross-thread reduction, nothing
    between the loads and the stores but an XOR and a sum in registers.
    """
    oy = tl.program_id(0)
    n = tl.program_id(1)
    y0 = tl.load(rows_ptr + 2 * oy)
    y1 = tl.load(rows_ptr + 2 * oy + 1)
    image = src + n.to(tl.int64) * H * W3
    i = tl.arange(0, BLOCK)
    inside = i < W3 // 4
    a = tl.load((image + y0.to(tl.int64) * W3).to(tl.pointer_type(tl.uint32)) + i, mask=inside, other=0)
    b = tl.load((image + y1.to(tl.int64) * W3).to(tl.pointer_type(tl.uint32)) + i, mask=inside, other=0)
    # Depends on every byte read, so nothing is optimized away; the sum stays within a thread's own words.
    folded = tl.sum(tl.reshape((a ^ b).to(tl.float32), [OUT_BLOCK, BLOCK // OUT_BLOCK]), axis=1)
    j = tl.arange(0, OUT_BLOCK)
    o = out + n.to(tl.int64) * 3 * OH * OW + oy * OW + j
    for c in tl.static_range(3):
        tl.store(o + c * OH * OW, (folded * 2.0**-32).to(tl.float16), mask=j < OW)


class Timer:
    """Median CUDA-event time of a call after putting L2 in a given state."""

    def __init__(self) -> None:
        self.flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        self.clean = torch.empty(64 * 2**20 // 4, dtype=torch.int32, device="cuda")

    def __call__(self, fn, l2: str, reps: int = 200) -> float:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        pairs = []
        for _ in range(reps):
            if l2 in ("dirty", "clean"):
                self.flush.zero_()
            if l2 == "clean":
                self.clean.sum()  # reads evict the dirty lines (written back now, untimed), leave clean ones
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) * 1e3 for s, e in pairs)
        return times[len(times) // 2]


def main() -> dict:
    case = bench.CASES["1080p_b32"]
    cfg = PreprocessConfig(**case.options)
    x = bench._make_inputs(case, cfg, torch.Generator(device="cuda").manual_seed(0))
    n, h, w, _ = x.shape
    oh, ow = case.size
    ref = PP.preprocess_ref(x, case.size, config=cfg)
    out = torch.empty_like(ref)
    read, written = bench.touched_bytes(case, cfg)
    bw = bench.copy_bandwidth_gbs()
    timer = Timer()

    # The rows the bilinear taps read, per output row (the kernel's and PyTorch's index math).
    scale = torch.tensor(h / oh, dtype=torch.float32)
    y0 = ((torch.arange(oh, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0).to(torch.int64).clamp(max=h - 1)
    rows = torch.stack([y0, (y0 + 1).clamp(max=h - 1)], 1).flatten().to(torch.int32).cuda()
    ideal_out = torch.empty_like(ref)

    def ideal():
        _ideal_rows_kernel[(oh, n)](x, ideal_out, rows, h, w * 3, oh, ow, BLOCK=2048, OUT_BLOCK=256, num_warps=8)

    src = torch.empty((read + written) // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    compiled = torch.compile(bench._chain(cfg, (h, w), case.size), dynamic=False)
    compiled(x)
    calls = {
        "ours": lambda: preprocess(x, case.size, config=cfg, out=out),
        "torch_compile": lambda: compiled(x),
        "ideal_rows": ideal,
        "same_bytes_copy": lambda: dst.copy_(src),
    }
    result = {
        "env": environment(),
        "case": case.name,
        "bytes_read": read,
        "bytes_written": written,
        "copy_bandwidth_gbs": bw,
        "floor_us": (read + written) / (bw * 1e9) * 1e6,
        "tile": KERNELS.TILE,
        "l2": {},
        "do_bench_us": {k: bench._do_bench(f) for k, f in calls.items()},
        "tiles": [],
    }
    for l2 in ("dirty", "clean", "none"):
        result["l2"][l2] = {k: timer(f, l2) for k, f in calls.items()}
        print(l2, {k: round(v, 1) for k, v in result["l2"][l2].items()}, flush=True)
    default = KERNELS.TILE
    try:
        for tile in TILES:
            KERNELS.TILE = tile
            out.fill_(float("nan"))
            calls["ours"]()
            err = float((out.float() - ref.float()).abs().max())
            row = {"tile": tile, "max_err": err, **{l2: timer(calls["ours"], l2) for l2 in ("dirty", "clean")}}
            result["tiles"].append(row)
            print(row, flush=True)
    finally:
        KERNELS.TILE = default
    LOGS.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name().split()[1].lower()
    path = LOGS / f"preprocess_floor_{gpu}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("diag_preprocess_floor needs a CUDA GPU")
    main()
