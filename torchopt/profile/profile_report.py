"""`ProfileReport`: one profiling run's results, figures and environment, saved as JSON and Markdown.

It sits on top of the result modules and renders each result with that module's Markdown writer
(`latency_markdown`, `trace_markdown`, `memory_markdown`). It collects named latency results (e.g.
``{"eager": ..., "optimized": ...}``), an optional trace summary, memory report and figure paths, and saves them
as ``<stem>.json`` and ``<stem>.md``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from torchopt.config import check_type
from torchopt.environment import environment
from torchopt.profile.files import check_output_dir, json_safe, write_json
from torchopt.profile.memory_tracking import MemoryReport, memory_markdown
from torchopt.profile.timing import LatencyResult, latency_markdown
from torchopt.profile.tracing import TraceResult, trace_markdown

__all__ = ["ProfileReport"]


@dataclasses.dataclass
class ProfileReport:
    """Everything one profiling run produced; `save` writes ``<stem>.json`` and ``<stem>.md``.

    Example::

        rep = ProfileReport("resnet50", latency={"eager": r0, "compiled": r1}, figures={"latency": "lat.png"})
        json_path, md_path = rep.save("out/")
    """

    title: str
    latency: dict[str, LatencyResult] = dataclasses.field(default_factory=dict)
    trace: TraceResult | None = None
    memory: MemoryReport | None = None
    figures: dict[str, str] = dataclasses.field(default_factory=dict)
    environment: dict[str, Any] = dataclasses.field(default_factory=environment)
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "title": self.title,
                "environment": self.environment,
                "latency": {k: v.to_dict() for k, v in self.latency.items()},
                "trace": self.trace.to_dict(events=True) if self.trace is not None else None,
                "memory": self.memory.to_dict() if self.memory is not None else None,
                "figures": self.figures,
                "notes": self.notes,
            }
        )

    def to_markdown(self, base_dir: str | os.PathLike | None = None) -> str:
        env = self.environment
        device = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('cpu_count')} cores)"
        parts = [
            f"# {self.title}",
            f"{device} · torch {env.get('torch')} · triton {env.get('triton')} · {env.get('date')}",
        ]
        parts += [f"> {n}" for n in self.notes]
        if self.latency:
            parts.append("## Latency\n\n" + latency_markdown(self.latency))
        if self.trace is not None:
            parts.append("## Trace\n\n" + trace_markdown(self.trace))
        if self.memory is not None:
            parts.append("## Memory\n\n" + memory_markdown(self.memory))
        if self.figures:
            figs = []
            for name, path in self.figures.items():
                rel = os.path.relpath(path, base_dir) if base_dir is not None else path
                figs.append(f"![{name}]({rel})")
            parts.append("## Figures\n\n" + "\n\n".join(figs))
        return "\n\n".join(parts) + "\n"

    def save(self, out_dir: str | os.PathLike, stem: str = "report") -> tuple[Path, Path]:
        """Write ``<out_dir>/<stem>.json`` and ``<out_dir>/<stem>.md``; returns both paths."""
        d = check_output_dir(out_dir, "out_dir")
        check_type("stem", stem, str)
        json_path = write_json(self.to_dict(), d / f"{stem}.json")
        md_path = d / f"{stem}.md"
        md_path.write_text(self.to_markdown(base_dir=d))
        return json_path, md_path
