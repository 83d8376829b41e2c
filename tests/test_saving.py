"""torchopt.load: the saved report comes back with its measurements; damaged saves (each damage ends in one
DamagedSaveError, a ValueError, naming the file); save's refusals of a format it cannot write (nothing is written
then)."""

import json

import pytest
import torch

import torchopt
from torchopt import InputSpec, Recipe
from torchopt.backends import BackendUnavailableError
from torchopt.recipes import CompileConfig, ValidateConfig
from torchopt.saving import DamagedSaveError, check_saved


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    spec = InputSpec("x", min=(1, 6), opt=(4, 6), max=(8, 6))
    recipe = Recipe([CompileConfig(backend="eager"), ValidateConfig(measure_latency=False)])
    fast = torchopt.optimize(model, recipe, inputs=[spec], progress=False)
    path = fast.save(tmp_path_factory.mktemp("saved") / "m")
    assert json.loads((path / "meta.json").read_text())["module_format"] == "export"
    return path


def _copy(saved, tmp_path):
    dst = tmp_path / "copy"
    dst.mkdir()
    for f in saved.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_intact_save_loads(saved):
    x = torch.randn(3, 6)
    assert torchopt.load(saved)(x).shape == (3, 3)


def test_load_keeps_the_saved_report_marked_as_loaded(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    spec = InputSpec("x", min=(1, 6), opt=(4, 6), max=(8, 6))
    recipe = Recipe([CompileConfig(backend="eager"), ValidateConfig(warmup=1, rounds=2, iters=1)])
    fast = torchopt.optimize(model, recipe, inputs=[spec], progress=False)
    saved = fast.report
    assert saved.latency_after and saved.accuracy and saved.steps  # measured: there is something to keep
    path = fast.save(tmp_path / "m")
    loaded = torchopt.load(path).report
    # The same figures, steps and notes as saved (compared as JSON keeps them: tuples come back as lists).
    expected = json.loads(saved.to_json())
    got = json.loads(loaded.to_json())
    for key in ("backend_reason", "notes"):
        del expected[key], got[key]
    assert got == expected
    assert loaded.steps[0].step == saved.steps[0].step and loaded.latency_speedup == saved.latency_speedup
    assert loaded.backend_reason == f"restored from {path} ({saved.backend_reason})"
    assert loaded.notes == [
        *saved.notes,
        f"loaded from {path} on cpu; latency, accuracy and memory figures were measured at save time on cpu",
    ]


def _meta_with_damaged_report_steps(text):
    meta = json.loads(text)
    meta["report"]["steps"] = ["compile"]
    return json.dumps(meta)


def _meta_without_module_format(text):
    meta = json.loads(text)
    del meta["module_format"]
    return json.dumps(meta)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_meta_without_module_format, r"meta\.json' is damaged: keys \['module_format'\] are missing"),
        (lambda text: json.dumps([1, 2]), r"meta\.json' is damaged: it holds a JSON list"),
        (lambda text: text[: len(text) // 2], r"meta\.json' is damaged: not valid JSON"),
        (lambda text: text.replace('"export"', '"onnx"'), r"meta\.json' is damaged: module_format is 'onnx'"),
        (lambda text: text.replace('"quantized": false', '"quantized": "no"'), r"'quantized' is a str"),
        (_meta_with_damaged_report_steps, r"meta\.json' is damaged: its report cannot be read \(report\['steps'\]"),
    ],
    ids=["no-module-format", "json-list", "truncated", "unknown-format", "wrong-type", "report-steps"],
)
def test_damaged_meta_json(saved, tmp_path, damage, message):
    path = _copy(saved, tmp_path)
    meta = path / "meta.json"
    meta.write_text(damage(meta.read_text()))
    with pytest.raises(DamagedSaveError, match=message) as info:
        torchopt.load(path)
    assert isinstance(info.value, ValueError) and "save the optimized module again" in str(info.value)


# How each reader of a save words a damaged module file: `load` reads it, `check_saved` only its zip directory.
READERS = {"load": (torchopt.load, "it cannot be read"), "check_saved": (check_saved, "it is not the zip archive")}


@pytest.mark.parametrize(
    "damage",
    [lambda data: data[: len(data) // 2], lambda data: b"this is not a zip archive\n" * 10, lambda data: b""],
    ids=["truncated", "text", "empty"],
)
@pytest.mark.parametrize("reader", list(READERS))
def test_damaged_module_pt2(saved, tmp_path, damage, reader):
    read, message = READERS[reader]
    path = _copy(saved, tmp_path)
    pt2 = path / "module.pt2"
    pt2.write_bytes(damage(pt2.read_bytes()))
    with pytest.raises(DamagedSaveError, match=rf"module\.pt2' is damaged: {message}"):
        read(path)


def test_missing_module_file(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / "module.pt2").unlink()
    with pytest.raises(DamagedSaveError, match=r"is damaged: module\.pt2 is missing"):
        torchopt.load(path)


def test_check_saved_passes_an_intact_save_without_loading_it(saved):
    assert check_saved(saved) is None


def test_check_saved_finds_a_missing_module_file_and_a_damaged_meta(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / "module.pt2").unlink()
    with pytest.raises(DamagedSaveError, match=r"is damaged: module\.pt2 is missing"):
        check_saved(path)
    (path / "meta.json").write_text("{")
    with pytest.raises(DamagedSaveError, match=r"meta\.json' is damaged: not valid JSON"):
        check_saved(path)
    with pytest.raises(ValueError, match="is not a saved torchopt module"):
        check_saved(tmp_path)


def test_path_must_be_a_path(saved):
    with pytest.raises(TypeError, match="path must be a str or os.PathLike .*got NoneType None"):
        torchopt.load(None)
    fast = torchopt.load(saved)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike .*got NoneType None"):
        fast.save(None)
    with pytest.raises(TypeError, match="save needs the OptimizedModule .* got NoneType"):
        torchopt.saving.save(None, saved)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike .*got NoneType None"):
        check_saved(None)


class DataDependent(torch.nn.Module):
    """Branches on a tensor's value: torch.export cannot trace it (the directory format pickles it instead)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        y = self.fc(x)
        return y if y.sum() > 0 else -y


def test_unknown_format_is_refused_before_writing(saved, tmp_path):
    fast = torchopt.load(saved)
    with pytest.raises(ValueError, match=r"format must be one of \['directory', 'aoti', 'tensorrt'\], got 'onnx'"):
        fast.save(tmp_path / "new", format="onnx")
    with pytest.raises(TypeError, match=r"format must be .*str.*got int"):
        fast.save(tmp_path / "new", format=1)
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA (and so TensorRT) is missing")
def test_tensorrt_format_without_tensorrt_is_the_backend_error(saved, tmp_path):
    fast = torchopt.load(saved)
    with pytest.raises(
        BackendUnavailableError, match=r"serialized TensorRT engines need Torch-TensorRT: .*CUDA device"
    ):
        fast.save(tmp_path / "new", format="tensorrt")
    assert not (tmp_path / "new").exists()


def test_aoti_format_of_a_model_that_cannot_export_names_the_reason(tmp_path):
    spec = InputSpec("x", min=(1, 6), opt=(4, 6), max=(8, 6))
    recipe = Recipe([CompileConfig(backend="eager"), ValidateConfig(measure_latency=False)])
    fast = torchopt.optimize(DataDependent(), recipe, inputs=[spec], progress=False)
    with pytest.raises(
        ValueError, match=r"format 'aoti' needs a module torch.export can export .* torch.export failed"
    ):
        fast.save(tmp_path / "new", format="aoti")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("artifact", "message"),
    [("aoti", r"artifact is 'aoti', expected an object"), ({"format": "onnx"}, r"artifact is \{'format': 'onnx'\}")],
)
def test_damaged_artifact_entry(saved, tmp_path, artifact, message):
    path = _copy(saved, tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    meta["artifact"] = artifact
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DamagedSaveError, match=message):
        torchopt.load(path)


def test_aoti_compile_failure_writes_nothing(saved, tmp_path, monkeypatch):
    def no_compiler(program, package_path=None):
        raise RuntimeError("simulated: no C++ compiler found")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    fast = torchopt.load(saved)
    with pytest.raises(RuntimeError, match=r"AOTInductor could not compile .*no C\+\+ compiler found"):
        fast.save(tmp_path / "new", format="aoti")
    assert not (tmp_path / "new").exists()
