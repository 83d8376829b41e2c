"""config.pbtxt text, Triton's schema (tritonclient's model_config_pb2) and torchopt's semantic checks."""

import pytest

from torchopt.inputs import InputSpec
from torchopt.serve.triton_config import (
    TensorSpec,
    TritonConfig,
    TritonConfigError,
    check_semantics,
    derive_queue_delay_us,
    model_config_text,
    parse_model_config,
    profile_dims,
)

pytest.importorskip(
    "tritonclient.grpc", reason="the serve extra (tritonclient) is not installed; .ci/setup installs it"
)

SPECS = [InputSpec("x", min=(1, 3, 8, 8), opt=(4, 3, 16, 16), max=(8, 3, 32, 32))]
OUT = [TensorSpec("output", "float32", (10,))]
WARM = [TensorSpec("x", "float32", (3, 16, 16))]


def _text(platform="python", config=None, **kw):
    args = dict(
        name="m",
        platform=platform,
        max_batch_size=8,
        inputs=profile_dims(SPECS),
        outputs=OUT,
        config=config or TritonConfig(),
        queue_delay_us=100,
        instance_kind="cpu",
        warmup_batch=4,
        warmup_inputs=WARM,
    )
    args.update(kw)
    return model_config_text(**args)


def test_profile_dims_drop_batch_and_mark_variable_dims():
    assert profile_dims(SPECS) == [TensorSpec("x", "float32", (3, -1, -1))]
    static = [InputSpec("ids", dtype="int64", min=(1, 7), max=(4, 7))]
    assert profile_dims(static) == [TensorSpec("ids", "int64", (7,))]


@pytest.mark.parametrize("platform", ["python", "tensorrt_plan", "torch_aoti"])
def test_every_platform_config_parses_against_triton_schema(platform):
    cfg = TritonConfig(queue_timeout_us=500, max_queue_size=64, cuda_graphs=platform == "tensorrt_plan")
    kind = "gpu" if platform != "python" else "cpu"
    proto = parse_model_config(_text(platform, cfg, instance_kind=kind), "m/config.pbtxt")
    assert proto.max_batch_size == 8
    assert list(proto.input[0].dims) == [3, -1, -1]
    assert proto.dynamic_batching.max_queue_delay_microseconds == 100
    assert proto.dynamic_batching.default_queue_policy.max_queue_size == 64
    assert proto.model_warmup[0].batch_size == 4
    assert proto.optimization.cuda.graphs == (platform == "tensorrt_plan")
    check_semantics(proto, "m", inputs=profile_dims(SPECS), profile_batch=(1, 8), platform=platform)


def test_platform_lines():
    assert 'platform: "tensorrt_plan"' in _text("tensorrt_plan", instance_kind="gpu")
    text = _text("torch_aoti", instance_kind="gpu")
    assert 'backend: "pytorch"' in text and 'platform: "torch_aoti"' in text
    graphs = _text("tensorrt_plan", TritonConfig(cuda_graphs=True), preferred_batch_sizes=[4, 8])
    proto = parse_model_config(graphs, "m")
    assert [g.batch_size for g in proto.optimization.cuda.graph_spec] == [4, 8]
    assert list(proto.optimization.cuda.graph_spec[0].input["x"].dim) == [3, 16, 16]


@pytest.mark.parametrize(
    "bad, needle",
    [
        (("KIND_CPU", "KIND_CPX"), "has no value named KIND_CPX"),
        (("max_batch_size: 8", "max_batch_sise: 8"), "max_batch_sise"),
        (("max_batch_size: 8", 'max_batch_size: "eight"'), "max_batch_size"),
    ],
)
def test_schema_rejects_wrong_enum_field_and_type(bad, needle):
    with pytest.raises(
        TritonConfigError, match="m/config.pbtxt does not match Triton's model configuration schema"
    ) as e:
        parse_model_config(_text().replace(*bad), "m/config.pbtxt")
    assert needle in str(e.value)


def test_semantics_refuse_batch_above_profile():
    proto = parse_model_config(_text(max_batch_size=32), "m")
    with pytest.raises(TritonConfigError, match="max_batch_size 32 is above the batch max 8"):
        check_semantics(proto, "m", inputs=profile_dims(SPECS), profile_batch=(1, 8), platform="python")


def test_semantics_refuse_profile_not_starting_at_one():
    proto = parse_model_config(_text(), "m")
    with pytest.raises(TritonConfigError, match="starts at batch 2"):
        check_semantics(proto, "m", inputs=profile_dims(SPECS), profile_batch=(2, 8), platform="python")


def test_semantics_refuse_dims_that_differ_from_profile():
    proto = parse_model_config(_text().replace("dims: [ 3, -1, -1 ]", "dims: [ 3, 16, 16 ]"), "m")
    with pytest.raises(TritonConfigError, match=r"input 'x' has dims \[3, 16, 16\].*\[3, -1, -1\]"):
        check_semantics(proto, "m", inputs=profile_dims(SPECS), profile_batch=(1, 8), platform="python")


def test_semantics_refuse_cuda_graphs_outside_tensorrt():
    text = _text("python") + "optimization { cuda { graphs: true } }\n"
    proto = parse_model_config(text, "m")
    with pytest.raises(TritonConfigError, match="only read by the TensorRT backend, not by platform 'python'"):
        check_semantics(proto, "m", inputs=profile_dims(SPECS), profile_batch=(1, 8), platform="python")


def test_queue_delay_from_budget_and_measured_latency():
    delay, why = derive_queue_delay_us(TritonConfig(latency_budget_ms=10), 4.0)
    assert delay == 2000 and "2 × a full batch's p99 4.000 ms" in why  # the batch in flight and its own
    assert derive_queue_delay_us(TritonConfig(latency_budget_ms=10), 6.0) == (
        0,
        "budget 10 ms − 2 × a full batch's p99 6.000 ms (the batch in flight and its own), below 0: no wait",
    )
    assert derive_queue_delay_us(TritonConfig(max_queue_delay_us=250, latency_budget_ms=10), 4.0) == (250, "given")
    assert derive_queue_delay_us(TritonConfig(), None)[0] == 0
    with pytest.raises(TritonConfigError, match="latency_budget_ms=10: a full batch's p99 12.000 ms is not below"):
        derive_queue_delay_us(TritonConfig(latency_budget_ms=10), 12.0)
    with pytest.raises(TritonConfigError, match="needs the model's measured latency"):
        derive_queue_delay_us(TritonConfig(latency_budget_ms=10), None)


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("instance_kind", "tpu", "TritonConfig.instance_kind"),
        ("max_batch_size", 0, "TritonConfig.max_batch_size"),
        ("queue_timeout_action", "drop", "TritonConfig.queue_timeout_action"),
        ("gpus", [0, -1], r"TritonConfig.gpus\[1\]"),
        ("gpus", [1, 1], r"TritonConfig.gpus lists a GPU twice: \[1, 1\]"),
    ],
)
def test_config_errors_name_the_field(field, value, needle):
    with pytest.raises((TypeError, ValueError), match=needle):
        TritonConfig(**{field: value})


def test_config_round_trips_through_dict():
    cfg = TritonConfig(latency_budget_ms=5.0, gpus=[0, 1], instance_kind="gpu")
    assert TritonConfig.from_dict(cfg.to_dict()) == cfg


def test_gpus_with_cpu_instances_is_an_error_naming_both():
    with pytest.raises(
        ValueError, match=r"TritonConfig.gpus=\[0, 1\] places gpu instances, but instance_kind is 'cpu'"
    ):
        TritonConfig(gpus=[0, 1], instance_kind="cpu")


def test_one_gpu_instance_on_each_of_two_gpus_parses_against_triton_schema():
    cfg = TritonConfig(gpus=[0, 1], instance_kind="gpu", instance_count=1)
    proto = parse_model_config(_text("python", cfg, instance_kind="gpu"), "m/config.pbtxt")
    (group,) = proto.instance_group
    assert group.kind == group.KIND_GPU and group.count == 1 and list(group.gpus) == [0, 1]
    check_semantics(proto, "m", inputs=profile_dims(SPECS), profile_batch=(1, 8), platform="python")
