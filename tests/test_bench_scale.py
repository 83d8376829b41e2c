"""benchmarks/bench_scale.py on a machine without two GPUs: its plan, its argument checks and its refusal."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"


def _run(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_dry_run_prints_every_part_of_the_plan():
    out = _run("--dry-run", "--concurrency", "64", "256", "--images", "20000")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "triton     resnet50: gpus=[0] vs [0, 1] (KIND_GPU, count 1), concurrency [64, 256]" in lines[0]
    assert any(line.startswith("ray_serve  encoder: 1 vs 2 replicas (num_gpus=1)") for line in lines)
    assert any(
        line.startswith("ray_data   resnet50: 1 vs 2 workers (num_gpus=1), 20000 uint8 frames") for line in lines
    )
    assert len(lines) == 5


def test_a_bad_concurrency_is_a_one_line_usage_error():
    out = _run("--dry-run", "--concurrency", "0")
    assert out.returncode == 2 and "--concurrency values must be >= 1, got 0" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() >= 2, reason="two GPUs: it would run")
def test_fewer_than_two_gpus_is_refused_with_one_line():
    out = _run("--parts", "triton", env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "bench_scale needs >= 2 visible CUDA GPUs, found" in out.stderr
    assert "CUDA_VISIBLE_DEVICES=0" in out.stderr and "nvidia-h200-x2" in out.stderr


def test_the_multicast_switches_are_set_for_every_process_it_starts():
    code = f"import runpy, os; runpy.run_path({str(SCRIPT)!r}); print(os.environ['NCCL_NVLS_ENABLE'],"
    code += " os.environ['TORCH_SYMM_MEM_DISABLE_MULTICAST'], os.environ['NVSHMEM_DISABLE_NVLS'])"
    env = {k: v for k, v in os.environ.items() if k not in ("NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS")}
    # cwd: `python -c` puts it first on sys.path, as running the script puts its folder (its sibling _results).
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=SCRIPT.parent
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1", "1"]
