"""optimize() with the inputs people pass: one spec of any name, dict and list arguments, tied dims,
calib_data checked up front, a forward that returns nothing."""

import json

import pytest
import torch

import torchopt
from torchopt import InputSpec, Recipe
from torchopt.recipes import CastConfig, CompileConfig, ValidateConfig

QUICK = {"measure_latency": False}


def _recipe(backend="eager", **validate):
    return Recipe(
        [CastConfig(dtype="float32"), CompileConfig(backend=backend), ValidateConfig(**{**QUICK, **validate})]
    )


class DictModel(torch.nn.Module):
    """Hugging Face style: forward takes one dict of tensors."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, batch):
        h = self.emb(batch["input_ids"]) * batch["attention_mask"].unsqueeze(-1)
        return self.head(h.sum(1) / batch["attention_mask"].sum(1, keepdim=True))


class PairModel(torch.nn.Module):
    """forward takes a list of two tensors and a plain tensor."""

    def forward(self, pair, scale):
        return pair[0] @ pair[1] * scale


def _dict_specs(max_len=12):
    tied = {0: "batch", 1: "seq"}
    return [
        InputSpec(
            "batch.input_ids",
            dtype="int64",
            min=(1, 2),
            opt=(2, 6),
            max=(4, max_len),
            value_range=(0, 30),
            dim_names=tied,
        ),
        InputSpec("batch.attention_mask", min=(1, 2), opt=(2, 6), max=(4, max_len), value_range=(1, 2), dim_names=tied),
    ]


def _dict_batch(b=3, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 30, (b, n), generator=g), "attention_mask": torch.ones(b, n)}


def test_sequential_takes_a_spec_of_any_name(seed):
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    fast = torchopt.optimize(mlp, _recipe(), inputs=[InputSpec("x", min=(1, 6), max=(8, 6))], progress=False)
    x = torch.randn(5, 6)
    torch.testing.assert_close(fast(x), mlp(x))
    torch.testing.assert_close(fast(x=x), mlp(x))  # the spec's name is the keyword


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_dict_argument_one_spec_per_key(seed, backend):
    model = DictModel()
    fast = torchopt.optimize(model, _recipe(backend), inputs=_dict_specs(), progress=False)
    for b, n in [(1, 2), (3, 7), (4, 12)]:
        batch = _dict_batch(b, n)
        torch.testing.assert_close(fast(batch), model(batch), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast(batch=batch), model(batch), rtol=1e-5, atol=1e-6)


def test_dict_argument_save_and_load(seed, tmp_path):
    model = DictModel()
    fast = torchopt.optimize(model, _recipe(), inputs=_dict_specs(), progress=False)
    path = fast.save(tmp_path / "m")
    assert json.loads((path / "meta.json").read_text())["module_format"] == "export"  # flat program, no pickle
    loaded = torchopt.load(path)
    batch = _dict_batch(2, 9)
    torch.testing.assert_close(loaded(batch), model(batch), rtol=1e-5, atol=1e-6)


def test_dict_argument_keys_must_match_the_specs(seed):
    fast = torchopt.optimize(DictModel(), _recipe(), inputs=_dict_specs(), progress=False)
    batch = _dict_batch()
    with pytest.raises(ValueError, match=r"input 'batch' has keys \['input_ids'\].*missing \['attention_mask'\]"):
        fast({"input_ids": batch["input_ids"]})
    with pytest.raises(
        ValueError, match=r"no InputSpec for \['token_type_ids'\] \(add one, e.g. 'batch.token_type_ids'"
    ):
        fast({**batch, "token_type_ids": batch["input_ids"]})
    with pytest.raises(
        TypeError, match=r"input 'batch' must be a dict with keys \['input_ids', 'attention_mask'\], got Tensor"
    ):
        fast(batch["input_ids"])


def test_list_argument_by_position(seed):
    specs = [
        InputSpec("pair.0", min=(1, 4), max=(6, 4), dim_names={0: "rows"}),
        InputSpec("pair.1", shape=(4, 3)),
        InputSpec("scale", shape=(1,)),
    ]
    model = PairModel()
    fast = torchopt.optimize(model, _recipe(), inputs=specs, progress=False)
    a, b, s = torch.randn(5, 4), torch.randn(4, 3), torch.rand(1)
    torch.testing.assert_close(fast([a, b], s), model([a, b], s))
    torch.testing.assert_close(fast((a, b), scale=s), model([a, b], s))
    with pytest.raises(ValueError, match=r"input 'pair' has 1 items, the InputSpecs name 2"):
        fast([a], s)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["pair.0", "pair.2"], r"inputs under 'pair' name list positions \[0, 2\]; they must be 0..n-1"),
        (["pair.0", "pair.a"], r"inputs under 'pair' mix dict keys and list positions"),
        (
            ["batch", "batch.ids"],
            r"InputSpec 'batch.ids' reaches into 'batch', which another InputSpec names as a tensor",
        ),
        (["batch.ids", "batch"], r"InputSpec 'batch' names a tensor where other InputSpecs name its contents"),
    ],
)
def test_contradicting_paths_are_refused(names, message):
    with pytest.raises(ValueError, match=message):
        torchopt.inputs.normalize_profiles([InputSpec(n, shape=(2,)) for n in names])


def test_bad_path_names_are_refused():
    for name in ("batch.", "batch.01", "batch.input-ids", "0.x"):
        with pytest.raises(ValueError, match=r"dotted path .*got '" + name.replace(".", r"\.")):
            InputSpec(name, shape=(2,))


def test_tied_dims_checked_at_call_time(seed):
    fast = torchopt.optimize(DictModel(), _recipe(), inputs=_dict_specs(), progress=False)
    batch = {"input_ids": torch.randint(0, 30, (3, 7)), "attention_mask": torch.ones(3, 5)}
    with pytest.raises(
        ValueError,
        match=r"input 'batch.input_ids' dim 1 is 7 but input 'batch.attention_mask' dim 1 is 5; both are the dim 'seq'",
    ):
        fast(batch)


def test_dict_calib_data_feeds_validation(seed):
    batches = [_dict_batch(2, 5, seed=i) for i in range(3)]
    fast = torchopt.optimize(DictModel(), _recipe(batches=2), inputs=_dict_specs(), calib_data=batches, progress=False)
    assert fast.report.accuracy["samples"] == 4  # two calibration batches of 2 rows


def _conv_spec():
    return [InputSpec("x", min=(1, 3, 8, 8), opt=(2, 3, 8, 8), max=(4, 3, 8, 8))]


def _conv():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)).eval()


@pytest.fixture
def conv(seed):
    m = _conv()
    m(torch.randn(1, 3, 8, 8))  # materialize the lazy layer
    return m


@pytest.mark.parametrize(
    ("calib_data", "error", "message"),
    [
        (42, TypeError, r"calib_data must be a DataLoader, an iterable of batches .*got int"),
        ([], ValueError, r"calib_data is empty: it yielded no batch"),
        ((x for x in []), ValueError, r"calib_data is empty: it yielded no batch \(an exhausted generator"),
        (
            [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 9, 8)],
            ValueError,
            r"calib_data batch 1: input 'x' dim 2 is 9, outside the profile range \[8, 8\]",
        ),
        (
            [torch.randn(6, 3, 8, 8)],
            ValueError,
            r"calib_data batch 0: input 'x' dim 0 is 6, outside the profile range \[1, 4\]",
        ),
        (
            [torch.randn(2, 3, 8)],
            ValueError,
            r"calib_data batch 0: input 'x' has rank 3 \(shape \(2, 3, 8\)\), the profile expects rank 4",
        ),
        (
            ["text"],
            TypeError,
            r"calib_data batch 0 must be a tensor, a tuple/list of inputs or a dict of inputs, got str",
        ),
        (
            [torch.randint(0, 5, (2, 3, 8, 8))],
            TypeError,
            r"calib_data batch 0: input 'x' has dtype torch.int64, the spec expects float32",
        ),
    ],
    ids=[
        "int",
        "empty",
        "exhausted-generator",
        "wrong-static-dim",
        "batch-too-large",
        "wrong-rank",
        "str-batch",
        "int-dtype",
    ],
)
def test_calib_data_checked_before_any_step(conv, calib_data, error, message):
    calls = []
    conv.register_forward_pre_hook(lambda *_: calls.append(1))
    recipe = Recipe([CompileConfig(backend="eager"), ValidateConfig(warmup=1, iters=3)])
    with pytest.raises(error, match=message):
        torchopt.optimize(conv, recipe, inputs=_conv_spec(), calib_data=calib_data, progress=False)
    assert len(calls) <= 1  # at most the profile check's one run: no latency timing, no step


def test_calib_data_tuple_batches_drop_labels_and_generators_are_read_once(conv):
    gen = ((torch.randn(2, 3, 8, 8), torch.tensor([0, 1])) for _ in range(3))
    fast = torchopt.optimize(conv, _recipe(batches=3), inputs=_conv_spec(), calib_data=gen, progress=False)
    assert fast.report.accuracy["samples"] == 6


def test_callable_calib_data_with_dict_inputs_is_refused(seed):
    with pytest.raises(
        ValueError, match=r"calib_data as a callable fn\(model\) is not supported when inputs sit inside"
    ):
        torchopt.optimize(DictModel(), _recipe(), inputs=_dict_specs(), calib_data=lambda m: None, progress=False)


class ReturnsNothing(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        self.fc(x)  # forgot the return


class ReturnsConfig(torch.nn.Module):
    def forward(self, x):
        return {"scale": 2.0}


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (ReturnsNothing(), r"ReturnsNothing.forward returned None"),
        (ReturnsConfig(), r"ReturnsConfig.forward returned a dict holding no tensor"),
    ],
)
def test_forward_without_tensor_output_is_refused_up_front(model, message):
    with pytest.raises(ValueError, match=message + r" on profile 0's min shapes; .*does forward miss a `return`"):
        torchopt.optimize(model, _recipe(), inputs=[InputSpec("x", min=(1, 4), max=(4, 4))], progress=False)


def test_validate_warmup_zero_is_rejected_by_the_recipe():
    with pytest.raises(ValueError, match=r"validate.warmup must be > 0, got 0"):
        Recipe.from_dict({"name": "r", "steps": [{"validate": {"warmup": 0}}]})
    ValidateConfig(warmup=1)


def test_dict_inputs_quantize_with_dict_calib_data(seed):
    pytest.importorskip("modelopt")
    model = DictModel()
    recipe = Recipe.from_dict(
        {
            "name": "q",
            "steps": [
                {"quantize": {"format": "int8", "method": "max"}},
                {"compile": {"backend": "eager"}},
                {"validate": QUICK},
            ],
        }
    )
    batches = [_dict_batch(2, 6, seed=i) for i in range(3)]
    fast = torchopt.optimize(model, recipe, inputs=_dict_specs(), calib_data=batches, progress=False)
    assert fast.report.steps[0].details["calib_batches"] == 3
    batch = _dict_batch(3, 8, seed=9)
    assert torch.nn.functional.cosine_similarity(fast(batch).flatten(), model(batch).flatten(), dim=0) > 0.95
