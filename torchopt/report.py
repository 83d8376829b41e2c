"""`OptimizeReport`: what `optimize` did and measured, as text, a dict/JSON, Markdown and a figure.

Every figure is printed with what qualifies it: the speedup with its spread (`torchopt.profile.Speedup`) and
"UNSTABLE" when the measurement was; a fake-quant model's latency as a simulation, never as a speedup
headline. Table rows stay short: a long reason is cut in its row and given in full in a note (and the JSON).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["OptimizeReport", "StepRecord"]

ROW_REASON_CHARS = 80  # a reason longer than this is cut in its table row and given in full in a note

FAKE_QUANT_NOTE = (
    "fake-quant simulation: without TensorRT or real low-precision GEMMs (compile.lowp, on a GPU that has them)"
    " the quantized layers run as quantize-dequantize in float, which models int8/fp8 accuracy but not its speed"
    " (it is slower than float); the latency is not a speedup of a deployed int8/fp8 model"
)


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
    latency_speedup: dict[str, Any] | None = None  # torchopt.profile.Speedup.to_dict(): median, low, high...
    fake_quant: bool = False  # quantized layers simulated in float (no TensorRT): latency is not deployable speed
    optimize_seconds: float = 0.0
    peak_memory_bytes: int | None = None
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)  # torchopt.environment.environment()

    @property
    def speedup(self) -> float | None:
        """The median per-round speedup (see `latency_speedup` for its spread and stability), or None."""
        return self.latency_speedup["median"] if self.latency_speedup else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["speedup"] = self.speedup
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizeReport:
        """The report `to_dict` wrote (its derived `speedup` is dropped; keys this version does not know are
        ignored). ValueError naming the key when one is missing or not what `to_dict` writes."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in ("recipe", "device", "backend", "precision"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"report[{key!r}] must be a str, got {type(data.get(key)).__name__}")
        steps = data.get("steps", [])
        if not isinstance(steps, list) or not all(
            isinstance(s, dict) and {"step", "seconds"} <= s.keys() for s in steps
        ):
            raise ValueError("report['steps'] must be a list of {'step', 'seconds', 'details'} objects")
        fields = {k: v for k, v in data.items() if k in names}
        fields["steps"] = [StepRecord(**s) for s in steps]
        return cls(**fields)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            Path(path).write_text(text)
        return text

    def speedup_text(self) -> str | None:
        """The speedup as the table prints it: '1.41x (1.32–1.50)' plus its qualifiers, or None."""
        sp = self.latency_speedup
        if not sp:
            return None
        text = f"{sp['median']:.2f}x ({sp['low']:.2f}–{sp['high']:.2f}), median and middle 80% of {sp['rounds']} rounds"
        if not sp["stable"]:
            text += "; UNSTABLE measurement (noisy machine?): do not rely on it"
        if self.fake_quant:
            text += "; fake-quant simulation, not a deployable speedup (see note)"
        return text

    def _rows(self) -> list[tuple[str, str]]:
        notes = []
        rows = [("recipe", self.recipe), ("device", self.device)]
        for key, name, reason in (
            ("backend", self.backend, self.backend_reason),
            ("precision", self.precision, self.precision_reason),
        ):
            rows.append((key, f"{name} — {_short(reason)}"))
            if _short(reason) != reason:
                notes.append(f"{key}: {reason}")
        if self.latency_before and self.latency_after:
            b, a = self.latency_before, self.latency_after
            flag = "" if b.get("stable", True) and a.get("stable", True) else "  (UNSTABLE)"
            rows.append(("latency p50 (ms)", f"{b['p50_ms']:.3f} → {a['p50_ms']:.3f}{flag}"))
            rows.append(("latency p99 (ms)", f"{b['p99_ms']:.3f} → {a['p99_ms']:.3f}"))
        if self.speedup_text():
            rows.append(("speedup", self.speedup_text()))
        if self.fake_quant and self.latency_speedup:
            notes.append(FAKE_QUANT_NOTE)
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
        rows.extend(("note", n) for n in [*notes, *self.notes])
        return rows

    def __str__(self) -> str:
        rows = self._rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)

    def to_markdown(self) -> str:
        lines = ["| | |", "|---|---|"]
        lines += [f"| {k} | {_escape_cell(v)} |" for k, v in self._rows()]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike) -> Path:
        """Save a figure (PNG/SVG by extension): latency p50/p99, the speedup with its spread, cosine and SQNR
        against their tolerances, each on its own axis."""
        from matplotlib.figure import Figure  # noqa: PLC0415  (matplotlib only when a figure is asked for)

        fig = Figure(figsize=(13, 3.8), constrained_layout=True)
        ax_lat, ax_sp, ax_cos, ax_sqnr = fig.subplots(1, 4, width_ratios=[1.5, 1.1, 1, 1])
        self._plot_latency(ax_lat)
        self._plot_speedup(ax_sp)
        self._plot_accuracy(ax_cos, ax_sqnr)
        fig.suptitle(
            f"torchopt recipe {self.recipe!r}: {self.backend}, {self.precision} on {self.device}"
            + ("  —  fake-quant: latency simulates accuracy, not speed" if self.fake_quant else "")
        )
        path = Path(path)
        fig.savefig(path, dpi=110)
        return path

    def _plot_latency(self, ax) -> None:
        if not (self.latency_before and self.latency_after):
            _empty(ax, "latency not measured")
            return
        before, after = self.latency_before, self.latency_after
        x = range(2)
        p50 = [before["p50_ms"], after["p50_ms"]]
        p99 = [before["p99_ms"], after["p99_ms"]]
        ax.bar([i - 0.2 for i in x], p50, width=0.4, label="p50", color=["#888", "#2a7"])
        ax.bar([i + 0.2 for i in x], p99, width=0.4, label="p99", color=["#bbb", "#8d8"])
        ax.set_xticks(list(x), ["original", "optimized"])
        ax.set_ylabel("latency per call (ms)")
        unstable = not (before.get("stable", True) and after.get("stable", True))
        ax.set_title("latency" + (" (UNSTABLE measurement)" if unstable else ""), fontsize=10)
        ax.set_ylim(0, 1.25 * max(p99))  # headroom so that the legend never covers a bar
        ax.legend(loc="upper center", ncols=2, fontsize=8)

    def _plot_speedup(self, ax) -> None:
        sp = self.latency_speedup
        if not sp:
            _empty(ax, "speedup not measured")
            return
        color = "#2a7" if sp["stable"] and not self.fake_quant else "#c83"
        ax.errorbar(
            [sp["median"]],
            [0],
            xerr=[[sp["median"] - sp["low"]], [sp["high"] - sp["median"]]],
            fmt="o",
            color=color,
            capsize=6,
            markersize=8,
        )
        ax.axvline(1.0, color="#555", linestyle="--", linewidth=1)
        lo, hi = min(sp["low"], 1.0), max(sp["high"], 1.0)
        pad = max(0.1, 0.25 * (hi - lo))
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(-1, 1)
        ax.set_yticks([])
        ax.set_xlabel("speedup over original (×, 1 = same)")
        qualifier = "UNSTABLE" if not sp["stable"] else f"middle 80% of {sp['rounds']} rounds"
        if self.fake_quant:
            qualifier = "fake-quant: not a speedup"
        ax.set_title(f"{sp['median']:.2f}x ({sp['low']:.2f}–{sp['high']:.2f})\n{qualifier}", fontsize=10)

    def _plot_accuracy(self, ax_cos, ax_sqnr) -> None:
        if not self.accuracy:
            _empty(ax_cos, "accuracy not checked")
            _empty(ax_sqnr, "")
            return
        tol = self.tolerances or {}
        verdict = {True: "pass", False: "FAILED", None: "not checked"}[self.accuracy_passed]
        cos = self.accuracy["cosine"]
        _plot_metric(ax_cos, cos, tol.get("min_cosine"), "cosine similarity", f"{cos:.6f}")
        low = min(cos, tol.get("min_cosine", cos), 0.999)
        ax_cos.set_ylim(low - 0.2 * (1 - low) - 1e-6, 1 + 0.1 * (1 - low))
        ax_cos.set_title(f"accuracy vs original: {verdict}", fontsize=10)
        sqnr = self.accuracy["sqnr_db"]
        shown = min(sqnr, 150.0)
        label = "∞: identical (bar cut at 150)" if sqnr == float("inf") else f"{sqnr:.1f} dB"
        _plot_metric(ax_sqnr, shown, tol.get("min_sqnr_db"), "SQNR (dB)", label)
        ax_sqnr.set_ylim(min(0.0, shown), max(shown, tol.get("min_sqnr_db", 0.0)) * 1.2 + 1)
        ax_sqnr.set_title("signal-to-noise vs original", fontsize=10)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_metric(ax, value: float, minimum: float | None, ylabel: str, label: str) -> None:
    """One bar for `value`, its tolerance as a dashed line, the value written above the bar."""
    ax.bar([0], [value], width=0.5, color="#47a")
    if minimum is not None:
        ax.axhline(minimum, color="#c33", linestyle="--", linewidth=1, label=f"minimum {minimum:g}")
        ax.legend(loc="lower right", fontsize=8)
    ax.text(0, value, label, ha="center", va="bottom", fontsize=9)
    ax.set_xticks([])
    ax.set_ylabel(ylabel)


def _short(reason: str) -> str:
    """A reason cut to its first clause when it is longer than a table row should be."""
    if len(reason) <= ROW_REASON_CHARS:
        return reason
    head = reason.split(" (", 1)[0].split("; ", 1)[0]
    return (head if len(head) <= ROW_REASON_CHARS else head[: ROW_REASON_CHARS - 1]) + "… (see note)"


def _escape_cell(text: str) -> str:
    """Markdown table cell text: pipes escaped (GitHub renders `\\|` as '|'), newlines as spaces."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
