"""Per-layer quantization sensitivity and the automatic choice of layers to keep in higher precision.

The model is quantized and calibrated once; a layer is "left out" by disabling its ModelOpt quantizers
(``TensorQuantizer.disable()``), which is exact for max / entropy / percentile calibration because the amax of
every quantizer was collected on float activations (ModelOpt disables quantization while collecting).

- ``all_but_one``: every layer quantized except L → how much keeping L recovers (``gain`` over the baseline);
- ``one_alone``: only L quantized → how much quantizing L alone costs.

`auto_keep` ranks layers by their all-but-one gain and keeps them greedily, most sensitive first, until the
budget (e.g. SQNR >= 20 dB, top-1 agreement >= 0.99) is met; it then drops kept layers the budget does not need
(least sensitive first) and verifies the final choice by quantizing a fresh copy with those keep rules. The
result is the fewest layers along the ranking, not a global optimum (that needs 2^N calibrations).
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from torchopt._compat import import_modelopt_quantization
from torchopt.config import check_choice
from torchopt.quantize._core import quantize_plain
from torchopt.quantize._tables import markdown_table, text_table
from torchopt.quantize.calibrate import CalibData
from torchopt.quantize.config import BUDGET_METRICS, Budget, QuantizeConfig, as_config
from torchopt.quantize.evaluate import EvalSet
from torchopt.quantize.keep import KeepRule
from torchopt.quantize.quant_summary import origin_type, quant_record

__all__ = ["MODES", "KeepSearch", "Sensitivity", "auto_keep", "sensitivity"]

MODES = ("all_but_one", "one_alone", "both")


def _layers(model: torch.nn.Module) -> dict[str, list[Any]]:
    """Layer name → its enabled quantizers (modules whose direct children are enabled TensorQuantizers)."""
    tq = import_modelopt_quantization().nn.TensorQuantizer
    record = quant_record(model)
    bypassed = record.bypassed if record else {}  # never called: toggling them changes nothing
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, tq):
            continue
        if name in bypassed:
            continue
        qs = [m for _, m in module.named_children() if isinstance(m, tq) and m.is_enabled]
        if qs:
            out[name] = qs
    return out


def _set(quantizers: Iterable[Any], on: bool) -> None:
    for q in quantizers:
        q.enable() if on else q.disable()


def _finite(v: float, cap: float) -> float:
    return cap if math.isinf(v) and v > 0 else (-cap if math.isinf(v) else v)


@dataclasses.dataclass
class Sensitivity:
    """Per-layer sensitivity rows and the ranking (most sensitive first).

    rows: ``{"layer", "type", "all_but_one", "gain", "one_alone"}``; ``all_but_one`` is the metric with every
        layer but this one quantized, ``gain`` its improvement over ``baseline`` (all quantized),
        ``one_alone`` the metric with only this layer quantized.
    """

    metric: str
    mode: str
    baseline: float
    rows: list[dict[str, Any]]
    ranking: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _cols(self) -> list[str]:
        cols = ["rank", "layer", "type"]
        if self.mode in ("all_but_one", "both"):
            cols += ["all_but_one", "gain"]
        if self.mode in ("one_alone", "both"):
            cols += ["one_alone"]
        return cols

    def _cells(self) -> list[list[str]]:
        order = {n: i + 1 for i, n in enumerate(self.ranking)}
        rows = sorted(self.rows, key=lambda r: order[r["layer"]])
        out = []
        for r in rows:
            vals = {"rank": str(order[r["layer"]]), **{k: v for k, v in r.items() if isinstance(v, str)}}
            for k in ("all_but_one", "gain", "one_alone"):
                if r.get(k) is not None:
                    vals[k] = f"{r[k]:.4g}"
            out.append([vals.get(c, "-") for c in self._cols()])
        return out

    def to_markdown(self) -> str:
        head = f"{self.metric} with every layer quantized: {self.baseline:.4g}"
        return head + "\n\n" + markdown_table(self._cols(), self._cells())

    def __str__(self) -> str:
        head = f"sensitivity ({self.mode}, {self.metric}; all layers quantized: {self.baseline:.4g})"
        return head + "\n" + text_table(self._cols(), self._cells())

    def plot(self, path: str | os.PathLike | None = None, top: int | None = None):
        """Ranking figure: the metric per layer when it is the only one left float (and/or the only one quantized)."""
        from matplotlib.figure import Figure  # noqa: PLC0415

        names = self.ranking[:top] if top else self.ranking
        by = {r["layer"]: r for r in self.rows}
        panels = []
        if self.mode in ("all_but_one", "both"):
            panels.append(("all_but_one", f"{self.metric}: all quantized except the layer"))
        if self.mode in ("one_alone", "both"):
            panels.append(("one_alone", f"{self.metric}: only the layer quantized"))
        finite = [v for r in self.rows for k, _ in panels if (v := r.get(k)) is not None and math.isfinite(v)]
        cap = (max(finite) * 1.1 + 1.0) if finite else 1.0
        fig = Figure(figsize=(5.2 * len(panels), 0.9 + 0.32 * len(names)), constrained_layout=True)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (key, title) in zip(axes, panels, strict=True):
            vals = [_finite(by[n][key], cap) for n in names]
            ax.barh(range(len(names)), vals, color="#c64" if key == "all_but_one" else "#47a")
            ax.set_yticks(range(len(names)), names, fontsize=8)
            ax.invert_yaxis()  # most sensitive on top
            ax.axvline(_finite(self.baseline, cap), color="#333", ls="--", lw=1, label="all layers quantized")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
        fig.suptitle("per-layer quantization sensitivity (most sensitive first)")
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=120)
        return fig


def _measure(qmodel: torch.nn.Module, evals: EvalSet, metric: str, mode: str, progress: bool) -> Sensitivity:
    from tqdm import tqdm  # noqa: PLC0415

    layers = _layers(qmodel)
    if not layers:
        raise ValueError("the quantized model has no enabled quantizer: nothing to rank")
    modules = dict(qmodel.named_modules())
    baseline = evals.metric(qmodel, metric)
    rows = {n: {"layer": n, "type": origin_type(modules[n])} for n in layers}
    everything = [q for qs in layers.values() for q in qs]
    steps = len(layers) * (2 if mode == "both" else 1)
    with tqdm(total=steps, desc=f"sensitivity ({metric})", disable=not progress, leave=False) as bar:
        try:
            if mode in ("all_but_one", "both"):
                for name, qs in layers.items():
                    _set(qs, False)
                    value = evals.metric(qmodel, metric)
                    _set(qs, True)
                    rows[name].update(all_but_one=value, gain=value - baseline)
                    bar.update()
            if mode in ("one_alone", "both"):
                _set(everything, False)
                for name, qs in layers.items():
                    _set(qs, True)
                    rows[name]["one_alone"] = evals.metric(qmodel, metric)
                    _set(qs, False)
                    bar.update()
        finally:
            _set(everything, True)
    if mode == "one_alone":
        ranking = sorted(layers, key=lambda n: rows[n]["one_alone"])  # the lower, the more it costs
    else:
        ranking = sorted(layers, key=lambda n: -rows[n]["gain"])
    return Sensitivity(metric, mode, baseline, list(rows.values()), ranking)


def _prepare(model, calib_data, eval_data, config, labels, num_inputs):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = as_config(config, {})
    if cfg.budget is not None:
        cfg = cfg.replace(budget=None)
    calib = (
        calib_data
        if isinstance(calib_data, CalibData)
        else CalibData(calib_data, max_batches=cfg.max_batches, num_inputs=num_inputs)
    )
    evals = EvalSet(model, calib if eval_data is None else eval_data, labels=labels, num_inputs=num_inputs)
    return cfg, calib, evals


def sensitivity(
    model: torch.nn.Module,
    calib_data: Any,
    eval_data: Any = None,
    *,
    config: QuantizeConfig | dict | str | None = None,
    mode: str = "all_but_one",
    metric: str = "sqnr_db",
    labels: Any = None,
    progress: bool = True,
    num_inputs: int | None = None,
) -> Sensitivity:
    """Rank the quantized layers of `model` by how much their quantization costs (the model is not modified).

    Args:
        mode: "all_but_one", "one_alone" or "both" (see the module docstring).
        metric: "sqnr_db", "cosine", "top1_agreement" or "accuracy" (needs labels).

    Example::

        sens = torchopt.quantize.sensitivity(model, calib, test_x, config="int8", mode="both")
        print(sens.ranking[:3]); sens.plot("sensitivity.png")
    """
    check_choice("mode", mode, list(MODES))
    check_choice("metric", metric, list(BUDGET_METRICS))
    cfg, calib, evals = _prepare(model, calib_data, eval_data, config, labels, num_inputs)
    qmodel = quantize_plain(copy.deepcopy(model), cfg, calib, progress=progress)
    return _measure(qmodel, evals, metric, mode, progress)


def _float32(value: float) -> float:
    return torch.tensor(value, dtype=torch.float32).item()


def _meets(value: float, target: float) -> bool:
    """Whether a metric meets the budget: ``value >= target`` in float32, the precision the metrics are
    computed in. The budget is a Python float (float64): 178/180 correct is 0.98888889 there but 0.98888886 as
    a float32 accuracy, which must count as meeting a budget of that same fraction."""
    return value >= target or _float32(value) >= _float32(target)


def _keep_rules(names: list[str], budget: Budget) -> list[KeepRule]:
    """Exact-name keep rules (glob-escaped) for the layers the search keeps."""
    reason = f"sensitivity search: needed for {budget.metric} >= {budget.min:g}"
    return [KeepRule(pattern=glob.escape(n), precision=budget.precision, reason=reason) for n in names]


@dataclasses.dataclass
class KeepSearch:
    """The automatic keep choice: which layers, what the verified metric is, and how it got there."""

    budget: Budget
    keep: list[str]
    achieved: float
    baseline: float
    met: bool
    sensitivity: Sensitivity
    history: list[dict[str, Any]]  # greedy steps on the calibrated model (estimates)
    verified: list[dict[str, Any]]  # fresh quantizations with the keep rules (what counts)
    message: str

    @property
    def keep_rules(self) -> list[KeepRule]:
        return _keep_rules(self.keep, self.budget)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["budget"] = self.budget.to_dict()
        return out


def auto_keep(
    model: torch.nn.Module,
    calib_data: Any,
    eval_data: Any = None,
    budget: Budget | dict | None = None,
    *,
    config: QuantizeConfig | dict | str | None = None,
    labels: Any = None,
    progress: bool = True,
    num_inputs: int | None = None,
) -> KeepSearch:
    """Find the fewest layers (along the sensitivity ranking) to keep unquantized so that the budget is met.

    The model is not modified. ``result.keep_rules`` go into ``QuantizeConfig.keep``; ``quantize(...,
    budget=...)`` does this for you.

    Example::

        res = torchopt.quantize.auto_keep(model, calib, test_x, {"metric": "top1_agreement", "min": 0.99})
        print(res.keep, res.achieved)
        qmodel = torchopt.quantize.quantize(model, "int8", calib, keep=res.keep_rules)
    """
    budget = _as_budget(budget)
    if budget.metric == "accuracy" and labels is None:
        raise ValueError("budget metric 'accuracy' needs labels=... (class ids of the evaluation samples)")
    cfg, calib, evals = _prepare(model, calib_data, eval_data, config, labels, num_inputs)
    qmodel = quantize_plain(copy.deepcopy(model), cfg, calib, progress=progress)
    sens = _measure(qmodel, evals, budget.metric, "all_but_one", progress)
    limit = budget.max_keep or len(sens.ranking)
    kept, history = _greedy_keep(qmodel, evals, sens, budget, limit)

    def fresh_metric(kept: list[str]) -> float:
        """The metric of a fresh quantization with `kept` left out (precision casts included)."""
        rules = [*cfg.keep, *_keep_rules(kept, budget)]
        vmodel = quantize_plain(
            copy.deepcopy(model), cfg.replace(keep=[r.to_dict() for r in rules]), calib, progress=progress
        )
        return evals.metric(vmodel, budget.metric)

    achieved, verified = _verify_keep(kept, sens, budget, limit, fresh_metric)
    met = _meets(achieved, budget.min)
    message = _search_message(budget, kept, achieved, len(sens.ranking), limit, met)
    return KeepSearch(budget, kept, achieved, sens.baseline, met, sens, history, verified, message)


def _as_budget(budget: Budget | dict | None) -> Budget:
    if budget is None:
        return Budget()
    if isinstance(budget, dict):
        return Budget.from_dict(budget, where="budget")
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a Budget or a {{metric, min}} mapping, got {type(budget).__name__}")
    return budget


def _greedy_keep(
    qmodel: torch.nn.Module, evals: EvalSet, sens: Sensitivity, budget: Budget, limit: int
) -> tuple[list[str], list[dict[str, Any]]]:
    """Keep layers along the sensitivity ranking until the budget is met, then drop those it does not need (least
    sensitive first), on the calibrated model with quantizers toggled: cheap estimates. Leaves every quantizer of
    the kept layers off."""
    layers = _layers(qmodel)
    kept: list[str] = []
    value, history = sens.baseline, [{"kept": [], "metric": sens.baseline}]
    for name in sens.ranking:
        if _meets(value, budget.min) or len(kept) >= limit:
            break
        kept.append(name)
        _set(layers[name], False)
        value = evals.metric(qmodel, budget.metric)
        history.append({"added": name, "kept": list(kept), "metric": value})
    if _meets(value, budget.min):
        for name in reversed(kept[:-1]):
            _set(layers[name], True)
            trial = evals.metric(qmodel, budget.metric)
            if _meets(trial, budget.min):
                kept.remove(name)
                value = trial
                history.append({"dropped": name, "kept": list(kept), "metric": value})
            else:
                _set(layers[name], False)
    return kept, history


def _verify_keep(
    kept: list[str], sens: Sensitivity, budget: Budget, limit: int, fresh_metric: Callable[[list[str]], float]
) -> tuple[float, list[dict[str, Any]]]:
    """Check `kept` on fresh quantizations, adding the next layers of the ranking while the budget is missed
    (extends `kept` in place); returns the metric reached and each check."""
    verified: list[dict[str, Any]] = []
    rest = [n for n in sens.ranking if n not in kept]
    while True:
        achieved = fresh_metric(kept) if kept else sens.baseline
        verified.append({"kept": list(kept), "metric": achieved})
        if _meets(achieved, budget.min) or not rest or len(kept) >= limit:
            return achieved, verified
        kept.append(rest.pop(0))


def _search_message(budget: Budget, kept: list[str], achieved: float, total: int, limit: int, met: bool) -> str:
    if met:
        return (
            f"{budget.metric} {achieved:.4g} >= {budget.min:g} keeping {len(kept)} of {total} layers {kept} unquantized"
        )
    return (
        f"budget {budget.metric} >= {budget.min:g} is not met: {achieved:.4g} keeping {len(kept)} of {total}"
        f" layers {kept} (limit {limit}); the format is too coarse for this model — try a finer format,"
        " another calibration method, or a lower budget"
    )
