"""`torch.export` of a module over its input profiles: examples, Dims and the exported program."""

import torch

from torchopt.export import export_args, export_dynamic_shapes, export_program
from torchopt.inputs import InputSpec

CPU = torch.device("cpu")
SMALL = [InputSpec("x", min=(1, 8), opt=(1, 8), max=(4, 8))]
LARGE = [InputSpec("x", min=(5, 8), opt=(8, 8), max=(16, 8))]


def test_one_dim_covers_the_union_of_the_profiles():
    dim = export_dynamic_shapes([SMALL, LARGE])["x"][0]
    assert (dim.min, dim.max) == (1, 16)


def test_examples_avoid_the_sizes_export_specializes():
    (x,) = export_args([SMALL], CPU, torch.float16)
    assert x.shape == (2, 8) and x.dtype == torch.float16  # opt batch 1 -> 2 (export specializes 0 and 1)
    (ids,) = export_args([[InputSpec("ids", shape=(3, 5), dtype="int64")]], CPU, torch.float16)
    assert ids.dtype == torch.int64  # integer inputs keep their dtype


def test_the_program_accepts_every_size_of_the_profiles():
    program = export_program(torch.nn.Linear(8, 2).eval(), [SMALL, LARGE], CPU, torch.float32)
    for batch in (1, 3, 16):
        assert program.module()(torch.randn(batch, 8)).shape == (batch, 2)
