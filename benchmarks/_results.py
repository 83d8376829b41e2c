"""A benchmark's results as files (shared by the bench scripts): `<name>.json` and `<name>.md` in the output
folder, and the Markdown printed, so what the terminal shows is what the committed notes hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchopt.profile.files import check_output_dir, write_json


def write_results(data: Any, markdown: str, out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write `data` to `out_dir/<name>.json` and `markdown` to `out_dir/<name>.md` (creating `out_dir`), print the
    Markdown; returns the two paths."""
    out = check_output_dir(out_dir, "--out")
    json_path = write_json(data, out / f"{name}.json")
    md_path = out / f"{name}.md"
    md_path.write_text(markdown)
    print(markdown)
    return json_path, md_path
