"""`OptimizeReport`: what `optimize` did and measured, as text, a dict/JSON, Markdown and a figure."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["OptimizeReport", "StepRecord"]


@dataclasses.dataclass
class StepRecord:
    step: str
    seconds: float
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class OptimizeReport:
    """Everything `optimize` decided and measured; `str(report)` is a readable summary."""

    recipe: str
    device: str
    backend: str = "eager"
    backend_reason: str = "no compile step in the recipe"
    precision: str = "float32"
    precision_reason: str = "no cast step in the recipe"
    profiles: list[list[dict[str, Any]]] = dataclasses.field(default_factory=list)
    steps: list[StepRecord] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    accuracy: dict[str, Any] | None = None
    tolerances: dict[str, float] | None = None
    accuracy_passed: bool | None = None
    latency_before: dict[str, Any] | None = None
    latency_after: dict[str, Any] | None = None
    optimize_seconds: float = 0.0
    peak_memory_bytes: int | None = None
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)  # torchopt.profile.environment()

    @property
    def speedup(self) -> float | None:
        if not (self.latency_before and self.latency_after):
            return None
        return self.latency_before["p50_ms"] / max(self.latency_after["p50_ms"], 1e-9)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["speedup"] = self.speedup
        return d

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            Path(path).write_text(text)
        return text

    def _rows(self) -> list[tuple[str, str]]:
        rows = [
            ("recipe", self.recipe),
            ("device", self.device),
            ("backend", f"{self.backend} — {self.backend_reason}"),
            ("precision", f"{self.precision} — {self.precision_reason}"),
        ]
        if self.latency_before and self.latency_after:
            b, a = self.latency_before, self.latency_after
            rows.append(("latency p50 (ms)", f"{b['p50_ms']:.3f} → {a['p50_ms']:.3f}  ({self.speedup:.2f}x)"))
            rows.append(("latency p99 (ms)", f"{b['p99_ms']:.3f} → {a['p99_ms']:.3f}"))
        if self.accuracy:
            acc = self.accuracy
            text = f"cosine {acc['cosine']:.6f}, SQNR {acc['sqnr_db']:.1f} dB, max|Δ| {acc['max_abs']:.3g}"
            if acc.get("top1_agreement") is not None:
                text += f", top-1 agreement {100 * acc['top1_agreement']:.1f}%"
            verdict = {True: "PASS", False: "FAIL", None: "not checked"}[self.accuracy_passed]
            rows.append(("accuracy", f"{verdict}: {text}"))
        rows.append(("optimize time (s)", f"{self.optimize_seconds:.1f}"))
        if self.peak_memory_bytes:
            rows.append(("peak memory (MiB)", f"{self.peak_memory_bytes / 2**20:.0f}"))
        rows.extend(("note", n) for n in self.notes)
        return rows

    def __str__(self) -> str:
        rows = self._rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)

    def to_markdown(self) -> str:
        lines = ["| | |", "|---|---|"]
        lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in self._rows()]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike) -> Path:
        """Save a before/after latency and accuracy figure (PNG/SVG by extension)."""
        from matplotlib.figure import Figure  # noqa: PLC0415  (matplotlib only when a figure is asked for)

        fig = Figure(figsize=(9, 3.6), constrained_layout=True)
        ax_lat, ax_acc = fig.subplots(1, 2, width_ratios=[1.4, 1])
        if self.latency_before and self.latency_after:
            labels = ["original", f"optimized\n({self.backend}, {self.precision})"]
            p50 = [self.latency_before["p50_ms"], self.latency_after["p50_ms"]]
            p99 = [self.latency_before["p99_ms"], self.latency_after["p99_ms"]]
            x = range(2)
            ax_lat.bar([i - 0.2 for i in x], p50, width=0.4, label="p50", color=["#888", "#2a7"])
            ax_lat.bar([i + 0.2 for i in x], p99, width=0.4, label="p99", color=["#bbb", "#8d8"])
            ax_lat.set_xticks(list(x), labels)
            ax_lat.set_ylabel("latency (ms)")
            ax_lat.set_title(f"{self.speedup:.2f}x faster (p50) on {self.device}")
            ax_lat.legend()
        else:
            ax_lat.text(0.5, 0.5, "latency not measured", ha="center", va="center")
        if self.accuracy:
            names = ["cosine", "SQNR (dB)"]
            vals = [self.accuracy["cosine"], min(self.accuracy["sqnr_db"], 150.0)]
            ax_acc.barh(names, [vals[0] * 100, vals[1]], color="#47a")
            for i, v in enumerate(vals):
                ax_acc.text(0, i, f" {v:.5g}", va="center", color="white")
            ax_acc.set_title("accuracy vs original" + ("" if self.accuracy_passed else " (FAILED)"))
            ax_acc.set_xlabel("cosine ×100 / SQNR dB")
        else:
            ax_acc.text(0.5, 0.5, "accuracy not checked", ha="center", va="center")
        fig.suptitle(f"torchopt recipe {self.recipe!r}")
        path = Path(path)
        fig.savefig(path, dpi=110)
        return path
