"""The README's Python examples run as written, with the names they leave to the reader bound to small models.

What is substituted, and nothing else:
- ``model = ...`` (the reader's trained model) and the other names the examples use without defining them
  (``loader``, ``calib_data``, ``eval_data``, ``x``, ``step``, ``frames_uint8_nhwc``, ``frame``) are bound
  beforehand to a small ``nn.Sequential`` CNN with ``conv1`` and ``head`` layers (its forward argument is
  named ``input``, the README's spec ``x``) and random batches (`_namespace`); where an example uses ``fast``
  without making it, it is that CNN optimized with the ``eager-fp32`` recipe over batch 1..8, and the serving
  example's stage functions (``decode``, ``prep``, ``post``) and inputs (``image``, ``jpegs``) are small
  stand-ins (`_serving_namespace`);
- ``device="cuda"`` becomes the test device (CPU here);
- a line whose comment says ``# ValueError: <message>`` must raise ValueError with that message;
- files are written to a temporary directory, where the README's YAML recipe is saved as ``my_recipe.yaml``.
The recipe example compiles with TensorRT, so its ``optimize`` line runs only where TensorRT is available.
"""

import ast
import collections
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_ERROR_COMMENT = re.compile(r"^(?P<indent>\s*)(?P<code>.*?)\s+#\s*(?P<error>ValueError|TypeError):\s*(?P<message>.+)$")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _python_block(marker: str) -> str:
    """The README's Python block containing `marker` (exactly one)."""
    found = [b for b in _blocks("python") if marker in b]
    assert len(found) == 1, f"{len(found)} README python blocks contain {marker!r}"
    return found[0]


def _runnable(code: str) -> str:
    """The block with the substitutions of the module docstring."""
    lines = []
    for line in code.splitlines():
        if re.match(r"^\s*model = \.\.\.", line):
            continue  # bound by _namespace
        line = line.replace('device="cuda"', f'device="{DEVICE}"')
        m = _ERROR_COMMENT.match(line)
        if m:
            line = (
                f"{m['indent']}with pytest.raises({m['error']}, match=re.escape({m['message'].strip()!r})):\n"
                f"{m['indent']}    {m['code']}"
            )
        lines.append(line)
    text = "\n".join(lines)
    ast.parse(text)
    return text


def _small_cnn() -> torch.nn.Sequential:
    """An nn.Sequential (forward's argument is named `input`, the README's spec `x`) with `conv1` and `head`."""
    layers = {
        "conv1": torch.nn.Conv2d(3, 8, 3, stride=4, padding=1),
        "act1": torch.nn.ReLU(),
        "conv2": torch.nn.Conv2d(8, 16, 3, stride=4, padding=1),
        "act2": torch.nn.ReLU(),
        "pool": torch.nn.AdaptiveAvgPool2d(1),
        "flat": torch.nn.Flatten(),
        "head": torch.nn.Linear(16, 10),
    }
    return torch.nn.Sequential(collections.OrderedDict(layers))


def _namespace() -> dict:
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 224, 224) for _ in range(3)]
    return {
        "pytest": pytest,
        "re": re,
        "model": _small_cnn().eval(),
        "loader": batches,
        "calib_data": batches,
        "eval_data": [torch.randn(4, 3, 224, 224) for _ in range(2)],
        "x": torch.randn(4, 3, 224, 224),
        "step": lambda x: x * 2,
        "frames_uint8_nhwc": torch.randint(0, 256, (2, 120, 160, 3), dtype=torch.uint8),
        "frame": torch.randint(0, 256, (360, 480, 3), dtype=torch.uint8),
    }


def _run(code: str, tmp_path, monkeypatch, namespace: dict | None = None) -> dict:
    monkeypatch.chdir(tmp_path)
    ns = namespace if namespace is not None else _namespace()
    exec(compile(_runnable(code), str(README), "exec"), ns)  # noqa: S102 - the README's own examples
    return ns


def test_every_python_block_is_covered():
    markers = [
        'torchopt.optimize(model, "default"',
        "Recipe.from_yaml",
        "import torchopt.quantize",
        "preprocess(",
        "tp.latency",
        "DynamicBatcher(",
        "ray_deployment(",  # run on the test session's Ray: tests/serve/ray_cluster/test_ray_readme.py
    ]
    assert len(_blocks("python")) == len(markers), "a README python block is not run by tests/test_readme.py"
    for marker in markers:
        _python_block(marker)


def test_error_comment_becomes_a_raises_check():
    code = "fast(y)  # ValueError: input 'x' dim 0 is 64"
    assert "pytest.raises(ValueError, match=re.escape(\"input 'x' dim 0 is 64\"))" in _runnable(code)


def test_python_api_example(tmp_path, monkeypatch):
    ns = _run(_python_block('torchopt.optimize(model, "default"'), tmp_path, monkeypatch)
    assert ns["y"].shape == (4, 10)
    assert isinstance(ns["fast"], torch.nn.Module) and (tmp_path / "resnet.torchopt" / "meta.json").is_file()


def test_recipe_example(tmp_path, monkeypatch):
    (yaml_block,) = [b for b in _blocks("yaml") if "my_recipe.yaml" in b]
    (tmp_path / "my_recipe.yaml").write_text(yaml_block)
    code = _python_block("Recipe.from_yaml")
    recipe_line, optimize_line = code.strip().splitlines()
    ns = _namespace()
    ns["spec"] = __import__("torchopt").InputSpec("x", min=(1, 3, 224, 224), max=(8, 3, 224, 224))
    _run("import torchopt\n" + recipe_line, tmp_path, monkeypatch, ns)
    assert [s.step for s in ns["recipe"].steps] == ["quantize", "compile", "validate"]
    from torchopt._compat import tensorrt_status

    if tensorrt_status()[0] is None or not torch.cuda.is_available():
        pytest.skip("the example compiles with TensorRT (not available here); its recipe parsed")
    _run(optimize_line, tmp_path, monkeypatch, ns)


def test_quantization_example(tmp_path, monkeypatch):
    pytest.importorskip("modelopt")
    ns = _run(_python_block("import torchopt.quantize"), tmp_path, monkeypatch)
    assert (tmp_path / "compare.png").is_file() and (tmp_path / "sensitivity.png").is_file()
    assert ns["found"] is not None


def test_preprocessing_example(tmp_path, monkeypatch):
    ns = _run(_python_block("preprocess("), tmp_path, monkeypatch)
    assert ns["x"].shape == (3, 640, 640) and ns["params"] is not None


def _optimized_cnn(ns: dict):
    import torchopt

    spec = torchopt.InputSpec("x", min=(1, 3, 224, 224), opt=(4, 3, 224, 224), max=(8, 3, 224, 224))
    return torchopt.optimize(ns["model"], "eager-fp32", inputs=[spec], progress=False)


def _serving_namespace() -> dict:
    ns = _namespace()
    ns["fast"] = _optimized_cnn(ns)
    ns["image"] = torch.randn(3, 224, 224)
    ns["jpegs"] = [torch.randint(0, 256, (240, 320, 3), dtype=torch.uint8) for _ in range(6)]
    ns["decode"] = lambda jpeg: jpeg  # already decoded frames stand in for JPEG bytes
    ns["prep"] = lambda frame: torch.nn.functional.interpolate(
        frame.permute(2, 0, 1)[None].float() / 255, size=(224, 224), mode="bilinear"
    )
    ns["post"] = lambda logits: int(logits.argmax())
    return ns


def test_serving_example(tmp_path, monkeypatch):
    ns = _serving_namespace()
    _run(_python_block("DynamicBatcher("), tmp_path, monkeypatch, ns)
    assert ns["logits"].shape == (10,)
    assert torch.allclose(ns["logits"], ns["model"](ns["image"][None])[0], atol=1e-5)
    assert isinstance(ns["result"], int) and ns["pipe"].stats().bottleneck in {"decode", "preprocess", "infer", "post"}


def test_profiling_example(tmp_path, monkeypatch):
    ns = _namespace()
    ns["fast"] = _optimized_cnn(ns)
    ns = _run(_python_block("tp.latency"), tmp_path, monkeypatch, ns)
    assert ns["res"].p50_ms > 0 and (tmp_path / "latency.png").is_file()
