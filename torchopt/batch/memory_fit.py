"""A linear memory model ``peak_bytes ≈ intercept + slope · batch`` fitted to measured probes.

The fit is ordinary least squares over the successful probes. Predictions of the largest batch under a byte
target are *conservative*: they extrapolate from the largest measured point (short extrapolation) with the
larger of the least-squares slope and every secant slope between neighbouring probes, raised by a margin. A
model that still under-predicts is caught by verification: the search runs every size it returns.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["MemoryModel", "fit_memory_model"]


@dataclasses.dataclass
class MemoryModel:
    """``peak_bytes ≈ intercept + slope · batch``; `points` are the (batch, peak bytes) it was fitted to."""

    intercept: float
    slope: float  # least-squares bytes per item
    max_slope: float  # steepest secant between neighbouring probes (>= slope when memory is convex)
    points: list[tuple[int, int]]
    margin: float = 0.0  # conservative predictions use max(slope, max_slope) * (1 + margin)

    @property
    def conservative_slope(self) -> float:
        return max(self.slope, self.max_slope) * (1.0 + self.margin)

    def predict(self, batch: float) -> float:
        """Least-squares estimate of the peak bytes at `batch`."""
        return self.intercept + self.slope * batch

    def largest_batch(self, target_bytes: float) -> float:
        """The largest batch predicted to stay within `target_bytes` (``math.inf`` if memory does not grow).

        Extrapolates from the largest measured point with the conservative slope; may be below that point
        when the point itself is over the target.
        """
        n, peak = max(self.points)
        slope = self.conservative_slope
        if slope <= 0:
            return math.inf if peak <= target_bytes else 0.0
        return n + (target_bytes - peak) / slope

    def bytes_per_item(self) -> float:
        return self.slope

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryModel:
        data = dict(data)
        data["points"] = [tuple(p) for p in data.get("points", [])]
        return cls(**data)

    def __str__(self) -> str:
        return f"{self.intercept / 2**20:.1f} MiB + {self.slope / 2**20:.3f} MiB × batch"


def fit_memory_model(points: Sequence[tuple[int, int]], *, base_bytes: float = 0.0, margin: float = 0.0) -> MemoryModel:
    """Fit `MemoryModel` to (batch, peak bytes) points.

    With a single point the slope is ``(peak - base_bytes) / batch``: an upper bound on the true slope when
    `base_bytes` is what is held without any batch (weights), since the fixed per-call workspace is counted as
    per-item memory. With two or more distinct sizes the fit is least squares.

    Example::

        model = fit_memory_model([(8, 1_200_000_000), (64, 3_000_000_000)])
        model.largest_batch(70e9)   # largest batch predicted to fit in 70 GB
    """
    if not points:
        raise ValueError("fit_memory_model needs at least one (batch, peak_bytes) point, got none")
    pts = sorted((int(n), int(m)) for n, m in points)
    for n, m in pts:
        if n < 1 or m < 0:
            raise ValueError(f"fit_memory_model: points need batch >= 1 and peak_bytes >= 0, got ({n}, {m})")
    # Several probes of one size (repeats) are averaged: a secant between them is meaningless.
    by_size: dict[int, list[int]] = {}
    for n, m in pts:
        by_size.setdefault(n, []).append(m)
    xs = sorted(by_size)
    ys = [sum(by_size[x]) / len(by_size[x]) for x in xs]
    if len(xs) == 1:
        slope = max(0.0, (ys[0] - base_bytes) / xs[0])
        return MemoryModel(float(base_bytes), slope, slope, pts, margin)
    mean_x = sum(xs) / len(xs)
    mean_y = sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    secants = [(y1 - y0) / (x1 - x0) for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:], strict=False)]
    return MemoryModel(mean_y - slope * mean_x, slope, max(secants), pts, margin)
