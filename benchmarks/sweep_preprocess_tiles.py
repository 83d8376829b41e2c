"""Tile sweep of the preprocessing kernel (how `TILE` and `TILE_COPY8` in
`torchopt/kernels/_preprocess_triton.py` were chosen): every (BLOCK_Y, BLOCK_X, num_warps) candidate per benchmark
case, timed with `do_bench` (L2 flushed) and back to back (events over 100 calls), checked against the reference.

Run (CUDA required, ~1 minute on an H100)::

    python benchmarks/sweep_preprocess_tiles.py [TAG]  # writes results/logs/preprocess_tile_sweep_<gpu>_<TAG>.json

The committed sweeps (H100, 2026-11-23): preprocess_tile_sweep_h100.json merges three runs of earlier kernels
(per-pixel variable channel shifts, then a constexpr channel order); preprocess_tile_sweep_h100_word32.json
also compared the 64-bit tap pairs the kernel had then against the 32-bit ones it keeps.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_preprocess as B  # noqa: E402

from torchopt.kernels import PreprocessConfig, preprocess, preprocess_ref  # noqa: E402

K = importlib.import_module("torchopt.kernels._preprocess_triton")
TILES = [(1, 128, 4), (2, 128, 4), (2, 64, 2), (1, 64, 2), (4, 32, 4), (2, 128, 2), (1, 256, 8)]
COPY8_TILES = [(16, 64, 4), (32, 32, 4), (8, 64, 2), (8, 128, 4), (16, 128, 8), (4, 256, 4), (32, 64, 8)]
CASES = ["1080p_b32", "480p_b64", "4k_letterbox_b8", "norm_b256", "nv12_b8", "list8_batch"]


def events_us(fn, calls: int = 100) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls * 1e3


def sweep_case(key: str) -> dict:
    case = B.CASES[key]
    cfg = PreprocessConfig(**case.options)
    x = B._make_inputs(case, cfg, torch.Generator(device="cuda").manual_seed(0))
    ref = preprocess_ref(x, case.size, config=cfg)
    out = torch.empty_like(ref)
    attr = "TILE_COPY8" if key == "norm_b256" else "TILE"
    default = getattr(K, attr)
    rows = []
    for tile in COPY8_TILES if key == "norm_b256" else TILES:
        setattr(K, attr, tile)
        out.fill_(float("nan"))
        call = lambda: preprocess(x, case.size, config=cfg, out=out)  # noqa: E731
        call()
        err = float((out.float() - ref.float()).abs().max())
        rows.append({"tile": tile, "flushed_us": B._do_bench(call), "back_to_back_us": events_us(call), "max_err": err})
        print(key, rows[-1], flush=True)
    setattr(K, attr, default)
    floor = sum(B.touched_bytes(case, cfg)) / (B.copy_bandwidth_gbs() * 1e9) * 1e6
    return {"constant": attr, "floor_us": floor, "tiles": rows}


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("sweep_preprocess_tiles needs a CUDA GPU")
    result = {"gpu": torch.cuda.get_device_name(), "cases": {key: sweep_case(key) for key in CASES}}
    name = torch.cuda.get_device_name().split()[1].lower()
    path = B.RESULTS / "logs" / f"preprocess_tile_sweep_{name}_{sys.argv[1] if len(sys.argv) > 1 else 'run'}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
