"""QuantizeConfig: formats and methods checked against each other, every option's errors naming the option,
"did you mean" for unknown keys, and the JSON round trip."""

import json

import pytest
import torch

import torchopt.quantize as tq


@pytest.mark.parametrize(
    ("fmt", "method", "match"),
    [
        ("int9", "max", r"format must be one of \['int8', 'int8_smoothquant', 'fp8', 'int4_awq', 'nvfp4'\]"),
        ("int8", "minmax", r"method must be one of \['auto', 'max', 'entropy'.*got 'minmax'"),
        ("fp8", "entropy", r"'entropy' does not apply to format 'fp8'; valid methods for fp8: max, percentile"),
        ("int8", "smoothquant", r"use format 'int8_smoothquant'"),
        ("int4_awq", "percentile", r"valid methods for int4_awq: awq, max"),
    ],
)
def test_unknown_or_inapplicable_method_and_format(fmt, method, match):
    with pytest.raises(ValueError, match=match):
        tq.QuantizeConfig(format=fmt, method=method)


def test_unknown_format_suggests_the_closest():
    with pytest.raises(ValueError, match=r"did you mean 'int8'\?"):
        tq.QuantizeConfig(format="int 8")


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"percentile": 0}, ValueError, r"quantize.percentile must be in \(0, 100\], got 0"),
        ({"percentile": "99"}, TypeError, r"quantize.percentile must be int or float"),
        ({"entropy_stride": 0}, ValueError, r"quantize.entropy_stride must be > 0"),
        ({"alpha": 0.5}, ValueError, r"alpha applies to format 'int8_smoothquant' only"),
        ({"format": "int8_smoothquant", "alpha": 2.0}, ValueError, r"must be in \[0, 1\], got 2.0"),
        ({"max_batches": 0}, ValueError, r"quantize.max_batches must be > 0"),
        ({"keep": "conv1"}, TypeError, r"quantize.keep must be a list of keep rules"),
        ({"keep": [3]}, TypeError, r"quantize.keep\[0\] must be a KeepRule"),
        ({"budget": {"metric": "psnr"}}, ValueError, r"budget.metric must be one of"),
        ({"budget": {"metric": "top1_agreement", "min": 99}}, ValueError, r"fraction in \[0, 1\], got 99.0"),
        ({"cache_dir": 3}, TypeError, r"quantize.cache_dir must be a directory path"),
    ],
)
def test_bad_options_name_the_option(options, error, match):
    with pytest.raises(error, match=match):
        tq.QuantizeConfig(**options)


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown key 'formt'.*did you mean 'format'\?"):
        tq.QuantizeConfig.from_dict({"formt": "int8"})


def test_config_round_trips_through_json():
    cfg = tq.QuantizeConfig(
        format="int8",
        method="entropy",
        keep=["conv1", {"pattern": "*head*", "precision": "fp32"}, tq.KeepRule(module_type=torch.nn.LayerNorm)],
        max_batches=4,
        cache_dir="/tmp/x",
        budget={"metric": "sqnr_db", "min": 25},
    )
    again = tq.QuantizeConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.keep[2].module_type == "torch.nn.modules.normalization.LayerNorm"
    assert cfg.resolved_method == "entropy" and tq.QuantizeConfig(format="int4_awq").resolved_method == "awq"
