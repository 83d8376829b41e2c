"""`torchopt.quantize` exports what README's "Quantization" section documents, and the section documents each
export."""

import re
from pathlib import Path

import torchopt.quantize as tq

README = Path(__file__).resolve().parents[2] / "README.md"


def _quantization_section() -> str:
    text = README.read_text()
    start = text.index("## Quantization")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_every_export_is_documented_in_the_readme():
    section = _quantization_section()
    undocumented = [name for name in tq.__all__ if not re.search(rf"(`|\btq\.){name}\b", section)]
    assert undocumented == [], "exported by torchopt.quantize but not in README's Quantization section"


def test_every_name_the_readme_uses_is_exported():
    used = set(re.findall(r"\btq\.(\w+)", _quantization_section()))
    assert used <= set(tq.__all__), f"README uses tq.{sorted(used - set(tq.__all__))}, which are not exported"


def test_exports_exist():
    assert all(hasattr(tq, name) for name in tq.__all__)
