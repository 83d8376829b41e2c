"""torchopt.environment: the run's machine and versions record, read without importing triton."""

import subprocess
import sys

import pytest
import torch

from torchopt.environment import environment


def test_environment_fields():
    env = environment()
    assert env["torch"] == torch.__version__ and env["date"] and env["python"]
    assert (env["gpu"] is None) == (not torch.cuda.is_available())


def test_environment_reads_the_triton_version_without_importing_triton():
    code = "import sys, torchopt.environment as e; e.environment(); print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_environment_on_a_cpu_device_names_no_gpu_index_when_cuda_is_absent():
    env = environment("cpu")
    if not torch.cuda.is_available():
        assert env["gpu"] is None and "gpu_index" not in env


@pytest.mark.multi_gpu
def test_environment_describes_the_device_it_is_given():
    env = environment("cuda:1")
    assert env["gpu_index"] == 1 and env["gpu_count"] >= 2
    assert env["gpu"] == torch.cuda.get_device_properties(1).name
    assert environment(1)["gpu_index"] == 1
