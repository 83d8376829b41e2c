"""torchopt.environment: the run's machine and versions record, read without importing triton."""

import subprocess
import sys

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
