"""Several input profiles: calls routed by shape, out-of-profile inputs rejected before any backend sees them
(one message for every backend), and Inductor serving every size inside its profiles without recompiling.

On CPU dynamo specializes size 1 and the convolution's fake kernel adds a batch guard at 16, so one profile
can need several graphs; the Inductor backend compiles them all during `optimize` by warming up at the
profile points (min, min+1, opt, max-1, max), and these tests count dynamo's unique graphs afterwards.
"""

from __future__ import annotations

import json

import pytest
import torch

import torchopt
from torchopt import InputSpec, Recipe
from torchopt.backends import BACKENDS, Backend
from torchopt.backends.tensorrt import export_profile
from torchopt.recipes import CastConfig, CompileConfig, ValidateConfig

# Inductor vs eager in float32: different kernels reassociate sums; CUDA convolutions may use TF32 in both.
TOLERANCES = {"cpu": {"rtol": 1e-4, "atol": 1e-4}, "cuda": {"rtol": 2e-3, "atol": 2e-3}}


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _recipe(backend: str) -> Recipe:
    return Recipe([CastConfig(dtype="float32"), CompileConfig(backend=backend), ValidateConfig(measure_latency=False)])


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def _batch_profiles(feature: tuple[int, ...], ranges: list[tuple[int, int, int]], name: str = "input"):
    return [[InputSpec(name, min=(lo, *feature), opt=(opt, *feature), max=(hi, *feature))] for lo, opt, hi in ranges]


MLP_PROFILES = _batch_profiles((16,), [(1, 4, 8), (9, 16, 24)])


# ------------------------------------------------------------------------------------------------ routing


class _RecordingBackend(Backend):
    """Runs the eager module but records which profile's runner each call reached."""

    name = "recording"

    def build(self, model, profiles, runtime, settings, log):
        self.calls: list[tuple[int, tuple[int, ...]]] = []

        def runner(index):
            def run(*args):
                self.calls.append((index, tuple(args[0].shape)))
                return model(*args)

            return run

        return [runner(p) for p in range(len(profiles))]


@pytest.fixture
def recording(monkeypatch):
    backend = _RecordingBackend()
    monkeypatch.setitem(BACKENDS, backend.name, backend)
    return backend


def test_calls_reach_the_runner_of_their_profile(recording, seed):
    model = _mlp().eval()
    fast = torchopt.optimize(model, _recipe("recording"), inputs=MLP_PROFILES, progress=False)
    recording.calls.clear()
    for batch in (1, 8, 9, 24, 3, 17):
        x = torch.randn(batch, 16)
        torch.testing.assert_close(fast(x), model(x))
    assert recording.calls == [(0, (1, 16)), (0, (8, 16)), (1, (9, 16)), (1, (24, 16)), (0, (3, 16)), (1, (17, 16))]
    with pytest.raises(ValueError, match=r"input shapes \{'input': \(25, 16\)\} fit none of the 2 profiles"):
        fast(torch.randn(25, 16))
    assert len(recording.calls) == 6  # rejected before dispatch


class _ProgramRunner:
    def __init__(self, program: torch.export.ExportedProgram):
        self.program, self.module = program, program.module()

    def __call__(self, *args):
        return self.module(*args)


class _ExportPerProfileBackend(Backend):
    """The TensorRT backend's flow without TensorRT: one torch.export program per profile (with that profile's
    dim ranges, checked by the program at call time), saved in the backend's own files."""

    name = "export-per-profile"

    def build(self, model, profiles, runtime, settings, log):
        self.builds = getattr(self, "builds", 0) + 1
        return [
            _ProgramRunner(export_profile(model, prof, device=runtime.device, dtype=runtime.dtype, index=p))
            for p, prof in enumerate(profiles)
        ]

    def save(self, runners, path):
        files = [f"program{i}.pt2" for i in range(len(runners))]
        for name, runner in zip(files, runners, strict=True):
            torch.export.save(runner.program, path / name)
        return {"files": files}

    def load(self, path, meta, profiles, runtime, log):
        return [_ProgramRunner(torch.export.load(path / name)) for name in meta["files"]]


def test_backend_files_are_saved_and_loaded_per_profile(monkeypatch, tmp_path, seed):
    backend = _ExportPerProfileBackend()
    monkeypatch.setitem(BACKENDS, backend.name, backend)
    model = _mlp().eval()
    fast = torchopt.optimize(model, _recipe(backend.name), inputs=MLP_PROFILES, progress=False)
    fast.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["backend_files"] == {"backend": backend.name, "files": ["program0.pt2", "program1.pt2"]}
    loaded = torchopt.load(tmp_path / "m")
    assert backend.builds == 1  # the runners came from the files, not from a new compile
    assert loaded.report.backend == backend.name
    with pytest.raises(AssertionError, match="Guard failed"):  # a runner accepts only its profile's range...
        loaded.runners[0](torch.randn(20, 16))
    for batch in (1, 8, 9, 24):  # ...so these pass only when each call reaches the right runner
        x = torch.randn(batch, 16)
        torch.testing.assert_close(loaded(x), model(x), **TOLERANCES["cpu"])
    big = torch.randn(25, 16)
    assert _out_of_profile_message(loaded, big) == _out_of_profile_message(fast, big)


# --------------------------------------------------------------------------- Inductor: no recompiles


@pytest.fixture(scope="module")
def inductor_mlp():
    torch.manual_seed(0)
    model = _mlp().eval()
    before = _graphs()
    fast = torchopt.optimize(model, _recipe("inductor"), inputs=MLP_PROFILES, progress=False)
    return model, fast, _graphs() - before


@pytest.mark.slow
def test_inductor_profiles_serve_every_size_without_recompiling(inductor_mlp):
    model, fast, built = inductor_mlp
    compile_step = next(s for s in fast.report.steps if s.step == "compile")
    assert built >= 1 and compile_step.details["graphs"] == built
    before = _graphs()
    gen = torch.Generator().manual_seed(7)
    for profile in MLP_PROFILES:
        spec = profile[0]
        for batch in range(spec.min[0], spec.max[0] + 1):
            x = torch.randn(batch, 16, generator=gen)
            torch.testing.assert_close(fast(x), model(x), **TOLERANCES["cpu"])
    assert _graphs() - before == 0


@pytest.mark.slow
def test_conv_profile_across_the_batch_16_guard(seed):
    """The CPU convolution guards batch < 16: the warm-up at min+1 and max-1 builds both sides."""
    torch._dynamo.reset()
    model = ConvNet().eval()
    profiles = _batch_profiles((3, 8, 8), [(1, 8, 32)], name="x")
    fast = torchopt.optimize(model, _recipe("inductor"), inputs=profiles, progress=False)
    before = _graphs()
    for batch in range(1, 33):
        x = torch.randn(batch, 3, 8, 8)
        torch.testing.assert_close(fast(x), model(x), **TOLERANCES["cpu"])
    assert _graphs() - before == 0


def _out_of_profile_message(fast: torch.nn.Module, x: torch.Tensor) -> str:
    with pytest.raises(ValueError) as info:
        fast(x)
    return str(info.value)


@pytest.mark.slow
def test_out_of_profile_message_is_the_same_for_every_backend(inductor_mlp, recording):
    _, compiled, _ = inductor_mlp
    eager = torchopt.optimize(_mlp().eval(), _recipe("eager"), inputs=MLP_PROFILES, progress=False)
    routed = torchopt.optimize(_mlp().eval(), _recipe("recording"), inputs=MLP_PROFILES, progress=False)
    before = _graphs()
    for x in (torch.randn(25, 16), torch.randn(4, 15), torch.randn(4, 16, 1)):
        messages = {_out_of_profile_message(m, x) for m in (eager, compiled, routed)}
        assert len(messages) == 1, messages
    assert "fit none of the 2 profiles" in messages.pop()
    assert _graphs() - before == 0  # rejected before the compiled module saw them


def test_single_profile_message_names_input_dim_and_range():
    fast = torchopt.optimize(_mlp().eval(), _recipe("eager"), inputs=MLP_PROFILES[0], progress=False)
    with pytest.raises(ValueError, match=r"input 'input' dim 0 is 9, outside the profile range \[1, 8\]"):
        fast(torch.randn(9, 16))


# ------------------------------------------------------------------------------------------- bad input


def test_profile_rank_that_does_not_fit_the_model_is_a_torchopt_error():
    # measure_latency off: the engine times the original module at the opt shape before any step runs.
    spec = InputSpec("x", min=(1, 1, 3, 8, 8), max=(4, 1, 3, 8, 8))
    with pytest.raises(
        ValueError,
        match=r"the model fails on profile 0's min shapes \{'x': \(1, 1, 3, 8, 8\)\}"
        r" \(RuntimeError: .*\); check that each InputSpec has the rank and static dims"
        r" ConvNet.forward expects",
    ):
        torchopt.optimize(ConvNet(), _recipe("eager"), inputs=[spec], progress=False)


def test_overlapping_profiles_are_rejected():
    with pytest.raises(ValueError, match="profiles 0 and 1 overlap"):
        torchopt.optimize(
            _mlp(), _recipe("eager"), inputs=_batch_profiles((16,), [(1, 4, 8), (8, 12, 16)]), progress=False
        )


def test_min_above_max_is_rejected():
    with pytest.raises(ValueError, match=r"dim 0 needs min <= opt <= max, got min=8, opt=8, max=4"):
        InputSpec("input", min=(8, 16), opt=(8, 16), max=(4, 16))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"inductor": {"mode": "fastest"}}, r"inductor.mode must be one of"),
        ({"inductor": {"full_graph": True}}, r"unknown key 'full_graph' in .*compile.inductor \(did you mean"),
        ({"tensorrt": {"workspace": 1}}, r"unknown key 'workspace' in .*compile.tensorrt \(did you mean"),
        ({"backend": "tensorrtt"}, r"compile.backend must be one of .* \(did you mean 'tensorrt'\?\)"),
    ],
)
def test_unknown_build_settings_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict({"steps": [{"compile": options}]})


# ----------------------------------------------------------------------------------------- H100 parity


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("make", "profiles"),
    [
        (ConvNet, _batch_profiles((3, 32, 32), [(1, 16, 64)], name="x")),
        (_mlp, _batch_profiles((16,), [(1, 4, 8), (9, 32, 64)])),
    ],
    ids=["convnet-1-64", "mlp-two-profiles"],
)
def test_inductor_parity_on_gpu(make, profiles):
    """The same claim on CUDA (CUDA graphs on, as the inductor recipes do there)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = make().eval().cuda()
    fast = torchopt.optimize(model, _recipe("inductor"), inputs=profiles, device="cuda", progress=False)
    before = _graphs()
    for profile in profiles:
        spec = profile[0]
        for batch in range(spec.min[0], spec.max[0] + 1):
            x = torch.randn((batch, *spec.min[1:]), device="cuda")
            with torch.no_grad():
                torch.testing.assert_close(fast(x), model(x), **TOLERANCES["cuda"])
    assert _graphs() - before == 0
    hi = profiles[-1][0].max[0] + 1
    with pytest.raises(ValueError, match=r"outside the profile range|fit none of the"):
        fast(torch.randn((hi, *profiles[-1][0].min[1:]), device="cuda"))


def _encoder(d: int = 32) -> torch.nn.Module:
    layer = torch.nn.TransformerEncoderLayer(d, 4, dim_feedforward=2 * d, batch_first=True, dropout=0.0)
    return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def test_mha_fast_path_is_off_inside_calls_and_restored_after():
    from torchopt.backends.inductor import _has_mha_fast_path, _WithoutMHAFastPath

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.backends.mha.get_fastpath_enabled())
            return x

    assert _has_mha_fast_path(_encoder()) and not _has_mha_fast_path(_mlp())
    wrapped = _WithoutMHAFastPath(Probe())
    assert torch.backends.mha.get_fastpath_enabled()
    wrapped(torch.ones(2))
    assert seen == [False] and torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        wrapped(torch.ones(2))
        assert not torch.backends.mha.get_fastpath_enabled()  # the caller's own setting is kept
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


@pytest.mark.gpu
def test_transformer_encoder_compiles_with_dynamic_batch_and_sequence_on_gpu():
    """With the fast path kept, dynamo built no graph at all for this encoder (it ran eager); mha_fast_path=False
    compiles it with dynamic batch and sequence."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = _encoder(64).eval().cuda()
    spec = InputSpec(name="src", min=(1, 8, 64), opt=(8, 64, 64), max=(16, 128, 64))  # fp32 in, cast to fp16
    compile_config = CompileConfig.from_dict({"backend": "inductor", "inductor": {"mha_fast_path": False}})
    steps = [CastConfig(dtype="float16"), compile_config, ValidateConfig(measure_latency=False)]
    recipe = Recipe(steps)
    fast = torchopt.optimize(model, recipe, inputs=[spec], device="cuda", progress=False)
    compile_step = next(s for s in fast.report.steps if s.step == "compile")
    assert compile_step.details["graphs"] >= 1, compile_step
    before = _graphs()
    for batch, seq in [(1, 8), (3, 17), (8, 64), (16, 128)]:
        x = torch.randn(batch, seq, 64, device="cuda")
        with torch.no_grad():
            torch.testing.assert_close(fast(x).float(), model(x), atol=5e-2, rtol=5e-2)
    assert _graphs() - before == 0
