"""The Inductor backend: every size inside the profiles served without recompiling, out-of-profile inputs never
reaching the compiled module, and the MHA fast path turned off during calls.

On CPU dynamo specializes size 1 and the convolution's fake kernel adds a batch guard at 16, so one profile
can need several graphs; the Inductor backend compiles them all during `optimize` by warming up at the
profile points (min, min+1, opt, max-1, max), and these tests count dynamo's unique graphs afterwards.
"""

from __future__ import annotations

import pytest
import torch

import torchopt
from torchopt import InputSpec, Recipe
from torchopt.recipes import CastConfig, CompileConfig, ValidateConfig

# Inductor vs eager in float32: different kernels reassociate sums; CUDA convolutions may use TF32 in both.
TOLERANCES = {"cpu": {"rtol": 1e-4, "atol": 1e-4}, "cuda": {"rtol": 2e-3, "atol": 2e-3}}


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(scope="module")
def inductor_mlp(kit):
    torch.manual_seed(0)
    model = kit.mlp().eval()
    before = _graphs()
    fast = torchopt.optimize(model, kit.recipe("inductor"), inputs=kit.MLP_PROFILES, progress=False)
    return model, fast, _graphs() - before


@pytest.mark.slow
def test_inductor_profiles_serve_every_size_without_recompiling(inductor_mlp, kit):
    model, fast, built = inductor_mlp
    compile_step = next(s for s in fast.report.steps if s.step == "compile")
    assert built >= 1 and compile_step.details["graphs"] == built
    before = _graphs()
    gen = torch.Generator().manual_seed(7)
    for profile in kit.MLP_PROFILES:
        spec = profile[0]
        for batch in range(spec.min[0], spec.max[0] + 1):
            x = torch.randn(batch, 16, generator=gen)
            torch.testing.assert_close(fast(x), model(x), **TOLERANCES["cpu"])
    assert _graphs() - before == 0


@pytest.mark.slow
def test_conv_profile_across_the_batch_16_guard(seed, kit):
    """The CPU convolution guards batch < 16: the warm-up at min+1 and max-1 builds both sides."""
    torch._dynamo.reset()
    model = kit.ConvNet().eval()
    profiles = kit.profiles((3, 8, 8), [(1, 8, 32)], name="x")
    fast = torchopt.optimize(model, kit.recipe("inductor"), inputs=profiles, progress=False)
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
def test_out_of_profile_message_is_the_same_for_every_backend(inductor_mlp, recording, kit):
    _, compiled, _ = inductor_mlp
    eager = torchopt.optimize(kit.mlp().eval(), kit.recipe("eager"), inputs=kit.MLP_PROFILES, progress=False)
    routed = torchopt.optimize(kit.mlp().eval(), kit.recipe("recording"), inputs=kit.MLP_PROFILES, progress=False)
    before = _graphs()
    for x in (torch.randn(25, 16), torch.randn(4, 15), torch.randn(4, 16, 1)):
        messages = {_out_of_profile_message(m, x) for m in (eager, compiled, routed)}
        assert len(messages) == 1, messages
    assert "fit none of the 2 profiles" in messages.pop()
    assert _graphs() - before == 0  # rejected before the compiled module saw them


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["convnet-1-64", "mlp-two-profiles"])
def test_inductor_parity_on_gpu(case, kit):
    """The same claim on CUDA (CUDA graphs on, as the inductor recipes do there)."""
    make, profiles = {
        "convnet-1-64": (kit.ConvNet, kit.profiles((3, 32, 32), [(1, 16, 64)], name="x")),
        "mlp-two-profiles": (kit.mlp, kit.profiles((16,), [(1, 4, 8), (9, 32, 64)])),
    }[case]
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = make().eval().cuda()
    fast = torchopt.optimize(model, kit.recipe("inductor"), inputs=profiles, device="cuda", progress=False)
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


def test_mha_fast_path_is_off_inside_calls_and_restored_after(kit):
    from torchopt.backends.inductor import _has_mha_fast_path, _WithoutMHAFastPath

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.backends.mha.get_fastpath_enabled())
            return x

    assert _has_mha_fast_path(_encoder()) and not _has_mha_fast_path(kit.mlp())
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
