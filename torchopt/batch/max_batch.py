"""`find_max_batch`: the largest batch a step runs within a memory budget — predicted, verified, refined.

Procedure (each "probe" runs the step at one size, `calls_per_probe` times; the last call is measured after
the cache was emptied and the peak reset, so earlier calls absorb per-shape work such as cuDNN autotuning or
a torch.compile recompile):

1. Warm up at `start` (cuDNN autotune, compilation, lazily created optimizer state and library workspaces);
   its last call is measured like a probe.
2. Plan: probe sizes aimed at `plan_fraction` of the estimated maximum until the measured points span at least
   `min_span` of the budget (one probe when the first estimate is good), then fit ``peak = a + b · batch``.
3. Predict the largest batch within the target ``budget - headroom`` and **run it**.
4. Confirm: when the model sees no more room above a verified size, run one size `tolerance` above it (the
   real boundary often lies higher than live bytes predict: under pressure the allocator frees its cache and
   cuDNN picks smaller workspaces). Its failure proves the result within `tolerance` of the boundary.
5. Refine between the largest success and the smallest failure (an OOM, or a run whose peak exceeded the
   target): interpolate when the failure was measured; after an OOM, scale the allocator's own account of
   the failed allocation (live + fragments + requested bytes, `OomReport`) down to the target, and aim below
   the live-bytes prediction by the fragmentation allowance (doubled per OOM in a row), whichever is lower;
   bisect when the model under-predicts; until the gap is within `tolerance` (or, after a success, the
   next estimate gains less).

The target is enforced, not guessed, where the backend can (`CudaMemory.limit`): every probe runs with the
caching allocator capped at the target, so a probe either fits for real (the allocator frees its cache under
pressure, as it would in production) or raises a real OOM. Reserved peaks without pressure over-count (the
allocator keeps growing its cache), so on CUDA the model is fitted to live-tensor peaks
(``max_memory_allocated``) against the target less the reserved-but-unused gap left at the baseline; after an
OOM it aims lower by `fragmentation` of the target, and where the allocator's fragments were what failed
(attention and MLP temporaries of transformers split its segments: reserved stays ~25 % above live bytes even
at the limit), the OOM's own account scales the failed size down to the target in one step. Backends without
a limit (CPU RSS) are searched by measuring: a run whose peak exceeds the target is a failure.

The returned size is always one that ran with a peak within the target. Out-of-memory errors are recognized
by type (`torchopt.batch.oom.is_out_of_memory`); memory is recovered after leaving the ``except`` block,
and the result says whether live memory returned to its baseline. Any other error is re-raised unchanged,
with the batch size that triggered it noted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable
from typing import Any

from torchopt.batch._calls import (
    as_make_inputs,
    as_step,
    batch_device,
    build_batch,
    check_batch_limit,
    oom_text,
    run_guarded,
)
from torchopt.batch.memory_backends import MemoryBackend, memory_backend
from torchopt.batch.memory_fit import MemoryModel, fit_memory_model
from torchopt.batch.oom import OomReport, oom_report
from torchopt.config import ConfigBase, check_positive, check_range, check_type

__all__ = ["MaxBatchConfig", "MaxBatchResult", "Probe", "find_max_batch"]

_WHERE = "find_max_batch"
MiB = 2**20


@dataclasses.dataclass
class MaxBatchConfig(ConfigBase):
    """Every option of `find_max_batch`.

    memory_budget: bytes the step's peak may reach, counted like the backend counts (CUDA: the process's
        reserved memory, weights included). None = all this process can get now (``mem_get_info``: other
        processes count; a per-process memory fraction too). Required on CPU (peak RSS).
    headroom: bytes kept free below the budget; the search targets ``budget - headroom``.
    fragmentation: fraction of the target kept for allocator fragmentation and rounding under pressure, when
        the model is fitted to live-tensor bytes (CUDA): after an OOM, refinements aim at ``target -
        allowance``, the allowance being the reserved-but-unused bytes at the baseline plus this fraction.
    max_batch: the search never runs a larger batch (the result says when this was the limit).
    start: warm-up batch size; the smallest size the search can return.
    warmup: calls at `start` before measuring (cuDNN autotune, torch.compile, optimizer state).
    calls_per_probe: calls per probed size; the last one is measured.
    max_probes: probes after the warm-up before the search stops with the best verified size.
    tolerance: stop when the gap between the largest success and the smallest failure (or the predicted
        maximum) is below this fraction of the batch size; also the step of a confirmation run above a
        verified size, so a result limited by memory is within this fraction of the boundary.
    plan_fraction / min_span: planning probes aim at this fraction of the estimated maximum, until the
        measured peaks span this fraction of the bytes left up to the target.
    slope_margin: predictions use the steepest measured bytes/item raised by this fraction.
    progress: tqdm bar over the probes.
    """

    memory_budget: int | None = None
    headroom: int = 256 * MiB
    fragmentation: float = 0.03
    max_batch: int = 65536
    start: int = 2
    warmup: int = 2
    calls_per_probe: int = 2
    max_probes: int = 8
    tolerance: float = 0.04
    plan_fraction: float = 0.4
    min_span: float = 0.25
    slope_margin: float = 0.01
    progress: bool = True

    def __post_init__(self) -> None:
        if self.memory_budget is not None:
            check_positive("memory_budget", self.memory_budget)
        check_positive("headroom", self.headroom, allow_zero=True)
        check_batch_limit("max_batch", self.max_batch)
        check_positive("start", self.start)
        if self.start > self.max_batch:
            raise ValueError(f"start ({self.start}) must be <= max_batch ({self.max_batch})")
        check_positive("warmup", self.warmup)
        check_positive("calls_per_probe", self.calls_per_probe)
        check_positive("max_probes", self.max_probes)
        for name in ("fragmentation", "tolerance", "min_span", "slope_margin"):
            check_range(name, getattr(self, name), low=0, high=1, high_open=True)
        check_range("plan_fraction", self.plan_fraction, low=0, high=1, low_open=True, high_open=True)
        check_type("progress", self.progress, bool)


@dataclasses.dataclass
class Probe:
    """One run of the step at one batch size."""

    size: int
    status: str  # "ok", "oom" (allocation failed) or "over_budget" (ran, but its peak exceeded the target)
    peak_bytes: int | None  # None after an OOM: the step never finished
    seconds: float
    kind: str = "probe"  # "warmup" or "probe"
    peak_allocated_bytes: int | None = None
    message: str = ""  # the OOM message
    oom: OomReport | None = None  # the CUDA allocator's account of the failed allocation, when it gave one

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclasses.dataclass
class MaxBatchResult:
    """What `find_max_batch` found: `size` (always run successfully), the fitted model and every probe."""

    size: int
    model: MemoryModel
    probes: list[Probe]
    budget_bytes: int
    target_bytes: int
    headroom_bytes: int
    capacity_bytes: int
    total_bytes: int
    limited_by: str  # "memory", "max_batch" or "max_probes"
    baseline_bytes: int
    final_bytes: int
    memory_returned: bool
    backend: str
    seconds: float
    enforced: bool  # the probes ran under the backend's limit at the target (real OOMs past it)
    fitted_to: str  # "live" (peak_allocated_bytes, live tensors) or "peak" (peak_bytes): the model's units
    allowance_bytes: int  # kept below the target by refinements after an OOM (MaxBatchConfig.fragmentation)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_probes(self) -> int:
        """Probes after the warm-up."""
        return sum(p.kind == "probe" for p in self.probes)

    @property
    def num_ooms(self) -> int:
        return sum(p.status == "oom" for p in self.probes)

    @property
    def tested(self) -> bool:
        """The returned size ran with a peak within the target (always True; kept checkable)."""
        return any(p.ok and p.size == self.size for p in self.probes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(num_probes=self.num_probes, num_ooms=self.num_ooms)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        run = next(p for p in reversed(self.probes) if p.ok and p.size == self.size)
        live = f", live {run.peak_allocated_bytes / MiB:,.0f} MiB" if run.peak_allocated_bytes is not None else ""
        how = "enforced by the allocator" if self.enforced else "measured"
        lines = [
            f"max batch {self.size} ({self.limited_by}-limited): peak {run.peak_bytes / MiB:,.0f} MiB{live} of a"
            f" {self.target_bytes / MiB:,.0f} MiB target (budget {self.budget_bytes / MiB:,.0f} MiB"
            f" - headroom {self.headroom_bytes / MiB:,.0f} MiB, {how}) on {self.backend}",
            f"memory model ({self.fitted_to} bytes; after an OOM, refinements aim at target -"
            f" {self.allowance_bytes / MiB:,.0f} MiB): {self.model}",
            f"{self.num_probes} probes after warm-up ({self.num_ooms} OOM) in {self.seconds:.1f} s;"
            f" memory {'returned to' if self.memory_returned else 'did NOT return to'} baseline",
        ]
        for p in self.probes:
            mem = f"{p.peak_bytes / MiB:,.0f} MiB" if p.peak_bytes is not None else "-"
            alive = f"{p.peak_allocated_bytes / MiB:,.0f} MiB" if p.peak_allocated_bytes is not None else "-"
            account = (
                f"  (needed {p.oom.demand_bytes / MiB:,.0f} MiB, {p.oom.fragment_bytes / MiB:,.0f} MiB of them"
                " fragments)"
                if p.oom is not None
                else ""
            )
            lines.append(
                f"  {p.kind:<6} batch {p.size:>7}  {p.status:<11} peak {mem:>12}  live {alive:>12}  {p.seconds:.2f} s"
                + account
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def plot(self, ax=None):
        """Probes (the bytes the model was fitted to, against batch size) on the fitted line, with the budget,
        the target and, for a live-bytes fit, the line refinements after an OOM aim at (target - allowance)."""
        from matplotlib.figure import Figure

        if ax is None:
            fig = Figure(figsize=(6.4, 4.0), layout="constrained")
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        gib = 2**30
        top = max([p.size for p in self.probes] + [self.size])
        xs = [0, top * 1.1]
        ax.plot(xs, [self.model.predict(x) / gib for x in xs], color="0.6", lw=1, label=f"fit: {self.model}")
        styles = {"ok": ("o", "tab:green"), "over_budget": ("s", "tab:orange")}
        live = self.fitted_to == "live"
        for status, (marker, color) in styles.items():
            pts = [p for p in self.probes if p.status == status]
            if pts:
                ax.scatter(
                    [p.size for p in pts],
                    [(p.peak_allocated_bytes if live else p.peak_bytes) / gib for p in pts],
                    marker=marker,
                    color=color,
                    zorder=3,
                    label=status.replace("_", " "),
                )
        ooms = [p for p in self.probes if p.status == "oom"]
        if ooms:
            ax.scatter(
                [p.size for p in ooms],
                [self.budget_bytes / gib] * len(ooms),
                marker="x",
                color="tab:red",
                zorder=3,
                label="out of memory",
            )
        ax.axhline(self.budget_bytes / gib, color="tab:red", ls="--", lw=1, label="budget")
        ax.axhline(self.target_bytes / gib, color="tab:orange", ls=":", lw=1, label="budget - headroom")
        if live and self.allowance_bytes:
            ax.axhline(
                (self.target_bytes - self.allowance_bytes) / gib,
                color="tab:purple",
                ls=":",
                lw=1,
                label="target - allowance (refinements after an OOM)",
            )
        ax.axvline(self.size, color="tab:green", ls="-.", lw=1, label=f"max batch {self.size}")
        ax.set_xlabel("batch size")
        what = "peak live-tensor memory" if live else "peak memory"
        ax.set_ylabel(f"{what} (GiB, {self.backend})")
        ax.set_title(f"find_max_batch: {self.num_probes} probes after warm-up")
        ax.legend(fontsize="small")
        return fig


class _Search:
    """State of one search: the probes so far, the bracket, and the next size to run.

    The model is fitted to `fitted(probe)` bytes (live-tensor peaks when `live`, else measured peaks) and
    predicts within `fit_target` of those units; `target` (in `peak_bytes` units) judges the runs.
    """

    def __init__(
        self,
        cfg: MaxBatchConfig,
        target: int,
        base_bytes: int,
        *,
        baseline: int,
        live: bool,
        fit_target: int,
        safe_target: int,
    ):
        self.cfg = cfg
        self.target = target
        self.base_bytes = base_bytes
        self.baseline = baseline  # live bytes after the warm-up: memory must return to it after the search
        self.live = live
        self.fit_target = fit_target  # the target in fitted units: verification aims here
        self.safe_target = safe_target  # less the fragmentation allowance: where a refinement after an OOM aims
        self.probes: list[Probe] = []
        self.failures_in_a_row = 0

    @classmethod
    def after_warmup(cls, cfg: MaxBatchConfig, target: int, memory: MemoryBackend, warm: Probe) -> _Search:
        """The search that starts from the warm-up probe `warm`, with the memory held after it as the base."""
        baseline = int(memory.allocated_bytes())
        used = int(memory.used_bytes())
        # Reserved peaks over-count without memory pressure (the allocator keeps its cache), so fit live-tensor
        # peaks where the backend has them, and keep back what live bytes cannot show: the reserved-but-unused
        # bytes at the baseline, plus `fragmentation` of the target for fragmentation and rounding.
        live = warm.peak_allocated_bytes is not None
        allowance = (max(0, used - baseline) + math.ceil(cfg.fragmentation * target)) if live else 0
        gap = max(0, used - baseline) if live else 0
        search = cls(
            cfg,
            target,
            base_bytes=baseline if live else used,
            baseline=baseline,
            live=live,
            fit_target=target - gap,
            safe_target=target - allowance,
        )
        search.probes.append(warm)
        return search

    @property
    def fragment_allowance(self) -> int:
        """Bytes a refinement after an OOM keeps below the fitted target (`fragmentation` of the target)."""
        return self.fit_target - self.safe_target

    def fitted(self, p: Probe) -> int:
        return p.peak_allocated_bytes if self.live else p.peak_bytes

    @property
    def ok(self) -> list[Probe]:
        return [p for p in self.probes if p.ok]

    @property
    def num_probes(self) -> int:
        return sum(p.kind == "probe" for p in self.probes)

    @property
    def lo(self) -> Probe:
        return max(self.ok, key=lambda p: p.size)

    @property
    def hi(self) -> Probe | None:
        failed = [p for p in self.probes if not p.ok and p.size > self.lo.size]
        return min(failed, key=lambda p: p.size) if failed else None

    def oom_bound(self, p: Probe) -> float | None:
        """The size at which the allocator's account of `p`'s failure would fit the target; None without an
        account (or for a fit to measured peaks).

        At the failure the step needed ``demand = live + private pools + fragments + requested`` reserved bytes.
        Everything but the bytes held without a batch (weights, optimizer state: `base_bytes`, and the free
        blocks of CUDA-graph private pools) scales with the batch, so the same point of the step fits at
        ``size · (target - fixed) / (demand - fixed)``, its bytes per item raised by `slope_margin` like every
        prediction. Unlike the live-bytes model this counts the fragments, which only show under pressure, so
        no fragmentation allowance is taken off. Used only where the fragments exceed that allowance (else the
        failure is what the allowance is for, and the account may come from an allocation before the step's
        peak: scaling it would overshoot).
        """
        if not self.live or p.oom is None or p.oom.fragment_bytes <= self.fragment_allowance:
            return None
        # Free blocks cached by CUDA-graph private pools are reserved whatever the batch: fixed, like the base.
        fixed = self.base_bytes + p.oom.private_pool_bytes
        room = self.target - fixed
        per_batch = (p.oom.demand_bytes - fixed) * (1 + self.cfg.slope_margin)
        return p.size * room / per_batch if room > 0 and per_batch > 0 else None

    def model(self) -> MemoryModel:
        return fit_memory_model(
            [(p.size, self.fitted(p)) for p in self.ok],
            base_bytes=self.base_bytes,
            margin=self.cfg.slope_margin,
        )

    def next_size(self) -> tuple[int | None, str]:
        """The next size to run, or (None, why the search stops)."""
        cfg, lo, hi = self.cfg, self.lo, self.hi
        if lo.size >= cfg.max_batch:
            return None, "max_batch"
        model = self.model()
        if hi is None:
            predicted = model.largest_batch(self.fit_target)
            first = min(self.ok, key=lambda p: p.size)
            span = self.fitted(lo) - self.fitted(first)
            if len(self.ok) < 2 or span < cfg.min_span * (self.fit_target - self.fitted(first)):
                # Planning: a fit over a narrow range extrapolates its noise; aim well below the estimate
                # (a one-point estimate over-counts bytes/item, so this stays below the true maximum).
                size = max(2 * lo.size, _floor(cfg.plan_fraction * predicted))
                return min(size, cfg.max_batch), "plan"
            if predicted >= cfg.max_batch:
                return cfg.max_batch, "verify"
            if predicted < lo.size * (1 + cfg.tolerance) or predicted < lo.size + 1:
                # The model leaves less than `tolerance` to gain above a verified size, but the real boundary may
                # lie higher (under pressure the allocator frees its cache and cuDNN picks smaller workspaces):
                # run one size `tolerance` above. A failure there proves the result within `tolerance` of the
                # boundary; a success moves the search up by that step (the refitted model decides the next).
                return min(cfg.max_batch, max(lo.size + 1, math.ceil(lo.size * (1 + cfg.tolerance)))), "confirm"
            return _floor(predicted), "verify"
        gap = hi.size - lo.size
        if gap <= max(1, math.ceil(cfg.tolerance * hi.size)):
            return None, "memory"
        if hi.peak_bytes is not None:  # ran over the target: interpolate between two measured peaks
            # (on convex memory curves the secant lands below the crossing, so the next run succeeds). In
            # `peak_bytes` units: those are what the target judged.
            frac = (self.target - lo.peak_bytes) / max(hi.peak_bytes - lo.peak_bytes, 1)
            size, why = lo.size + _floor(frac * gap), "interpolate"
        else:  # an OOM: aim below the prediction by the allowance, doubled per OOM in a row
            backoff = self.fragment_allowance * 2 ** max(0, self.failures_in_a_row - 1)
            estimate = model.largest_batch(self.fit_target - backoff)
            bound = self.oom_bound(hi)
            if bound is not None and bound >= lo.size:  # a success above it would disprove it: then ignored
                # The allocator's account of the failure scaled to the target; it also sees the fragments.
                estimate = min(estimate, bound)
                if estimate < lo.size * (1 + cfg.tolerance):
                    # Less than `tolerance` to gain by both accounts: one run `tolerance` above the verified
                    # size proves the bracket (or moves it up, above the bound, which is then ignored).
                    size = max(lo.size + 1, math.ceil(lo.size * (1 + cfg.tolerance)))
                    return min(size, hi.size - 1), "confirm"
            if estimate <= lo.size:
                size, why = lo.size + gap // 2, "bisect"  # the model under-predicts: halve the bracket
            elif self.failures_in_a_row >= 2 and estimate > lo.size + gap // 2:
                size, why = lo.size + gap // 2, "bisect"  # OOMs in a row: the model is off, halve the bracket
            else:
                size, why = _floor(estimate), "refine"
        if why != "bisect" and self.failures_in_a_row == 0 and size < lo.size * (1 + cfg.tolerance):
            # The last run succeeded and the estimate that includes it leaves less than `tolerance` to gain
            # (stepping to it would creep up an item at a time). A measured failure above agrees: done. An
            # OOM without the allocator's account measured nothing, so the boundary may lie anywhere below it:
            # halve the bracket.
            if why == "interpolate":
                return None, "memory"
            size, why = lo.size + gap // 2, "bisect"
        step_back = max(1, math.ceil(cfg.tolerance * hi.size))
        return max(lo.size + 1, min(size, hi.size - step_back)), why


def _floor(x: float) -> int:
    return int(min(math.floor(x), 2**62)) if math.isfinite(x) else 2**62


def find_max_batch(
    fn_or_model: Any,
    make_inputs: Any,
    *,
    config: MaxBatchConfig | None = None,
    memory: MemoryBackend | None = None,
    **overrides: Any,
) -> MaxBatchResult:
    """The largest batch size `fn_or_model` runs within a memory budget; always a size it has run.

    Args:
        fn_or_model: an ``nn.Module`` (run as inference, under ``no_grad``) or any callable taking one batch,
            e.g. a training step with backward and optimizer.
        make_inputs: ``make_inputs(batch)`` → a tensor, a tuple of inputs or a dict of keyword inputs with
            `batch` items along dim 0; or InputSpec(s) (dim 0 is the batch, other dims at their max).
        config: a `MaxBatchConfig` (default: its defaults).
        **overrides: any field of `MaxBatchConfig` (memory_budget, headroom, max_batch, ...), replacing the
            config's value.
        memory: the memory backend (default: CUDA for a CUDA step, peak RSS on CPU when a budget is given).

    Example::

        model = torchvision.models.resnet50().cuda().half().eval()
        make = lambda n: torch.randn(n, 3, 224, 224, device="cuda", dtype=torch.float16)
        res = torchopt.batch.find_max_batch(model, make)
        print(res.size, res.num_probes)
        res.plot().savefig("max_batch.png")
    """
    t_start = time.perf_counter()
    cfg = MaxBatchConfig.merge(config, where=f"{_WHERE} options", **overrides)
    step = as_step(fn_or_model, _WHERE)
    make = as_make_inputs(make_inputs, fn_or_model, _WHERE, which="max")
    memory = _checked_backend(memory, fn_or_model, make, cfg)
    room = _Room.measure(memory, cfg)
    probe = _Prober(step, make, memory, room.target)
    limit = getattr(memory, "limit", None)
    from tqdm.auto import tqdm  # lazy: tqdm.auto looks for IPython

    bar = tqdm(total=cfg.max_probes + 1, desc=_WHERE, unit="probe", disable=not cfg.progress, leave=False)
    # Under the backend's limit a probe fits the target for real or fails; the previous limit is back on exit.
    enforce = limit(room.target) if limit is not None else contextlib.nullcontext()
    with bar, enforce:
        warm = _warm_up(probe, cfg, room)
        bar.update(1)
        search = _Search.after_warmup(cfg, room.target, memory, warm)
        limited_by = _probe_until_done(search, probe, cfg, bar)
    return _result(search, memory, cfg, room, limited_by, enforced=limit is not None, t_start=t_start)


_BACKEND_METHODS = (
    "free_bytes",
    "used_bytes",
    "allocated_bytes",
    "total_bytes",
    "reset_peak",
    "peak_bytes",
    "peak_allocated_bytes",
    "cleanup",
    "synchronize",
)


def _checked_backend(memory: Any, fn_or_model: Any, make: Callable[[int], Any], cfg: MaxBatchConfig) -> MemoryBackend:
    """The memory backend (`memory`, or the one for the step's device), after checking everything cheap before
    anything runs: a first batch is built (and checked) to find the device."""
    first = build_batch(make, cfg.start, _WHERE)
    if memory is None:
        memory = memory_backend(batch_device(fn_or_model, first), cfg.memory_budget)
    del first
    for name in _BACKEND_METHODS:
        if not callable(getattr(memory, name, None)):
            raise TypeError(f"memory must be a MemoryBackend (method {name}() is missing), got {memory!r}")
    limit = getattr(memory, "limit", None)  # optional: a backend that can enforce the target (CUDA)
    if limit is not None and not callable(limit):
        raise TypeError(f"memory.limit must be a method limit(nbytes) -> context manager or absent, got {limit!r}")
    return memory


@dataclasses.dataclass
class _Room:
    """The bytes the search works within: the device, what this process can get, the budget and the target."""

    total: int
    capacity: int
    budget: int
    target: int  # budget - headroom: what a probe's peak must stay within
    notes: list[str]

    @classmethod
    def measure(cls, memory: MemoryBackend, cfg: MaxBatchConfig) -> _Room:
        memory.cleanup()
        total = int(memory.total_bytes())
        capacity = int(memory.used_bytes() + memory.free_bytes())
        notes: list[str] = []
        if cfg.memory_budget is not None and cfg.memory_budget > total:
            raise ValueError(
                f"memory_budget={cfg.memory_budget} bytes ({cfg.memory_budget / 2**30:.2f} GiB) is larger than"
                f" the device ({total} bytes, {total / 2**30:.2f} GiB on {memory!r}); give a budget <= the device"
                " size, or None for all the memory this process can get"
            )
        budget = capacity if cfg.memory_budget is None else min(cfg.memory_budget, capacity)
        if cfg.memory_budget is not None and cfg.memory_budget > capacity:
            notes.append(
                f"memory_budget {cfg.memory_budget / MiB:,.0f} MiB exceeds what this process can get now"
                f" ({capacity / MiB:,.0f} MiB; other processes hold the rest): searched within the latter"
            )
        target = budget - cfg.headroom
        if target <= memory.used_bytes():
            raise ValueError(
                f"the search target (budget {budget} - headroom {cfg.headroom} = {target} bytes) leaves nothing"
                f" above what is already in use ({memory.used_bytes()} bytes): lower headroom or raise"
                " memory_budget"
            )
        return cls(total, capacity, budget, target, notes)


class _Prober:
    """Runs the step at one size and records it as a `Probe` (an OOM is a failed probe, not an error)."""

    def __init__(self, step: Callable[..., Any], make: Callable[[int], Any], memory: MemoryBackend, target: int):
        self.step = step
        self.make = make
        self.memory = memory
        self.target = target

    def __call__(self, size: int, calls: int, kind: str) -> Probe:
        t0 = time.perf_counter()
        peaks, failure = run_guarded(lambda: self._measure(size, calls), size, _WHERE, self.memory.cleanup)
        if failure is not None:
            seconds = time.perf_counter() - t0
            return Probe(size, "oom", None, seconds, kind, message=oom_text(failure), oom=oom_report(failure))
        self.memory.cleanup()
        peak, peak_alloc = peaks
        status = "ok" if peak <= self.target else "over_budget"
        return Probe(size, status, peak, time.perf_counter() - t0, kind, peak_alloc)

    def _measure(self, size: int, calls: int) -> tuple[int, int | None]:
        """`calls` calls at `size`; the peaks of the last one."""
        memory = self.memory
        args, kwargs = build_batch(self.make, size, _WHERE)
        for _ in range(calls - 1):
            self.step(*args, **kwargs)
        memory.synchronize()
        memory.cleanup()  # cached blocks of the earlier calls (e.g. autotune workspaces) must not count
        memory.reset_peak()
        out = self.step(*args, **kwargs)
        memory.synchronize()
        del out, args, kwargs
        return int(memory.peak_bytes()), memory.peak_allocated_bytes()


def _warm_up(probe: _Prober, cfg: MaxBatchConfig, room: _Room) -> Probe:
    """The warm-up probe at `start`; a step that does not fit even there is an error."""
    warm = probe(cfg.start, cfg.warmup, "warmup")
    if not warm.ok:
        used = "ran out of memory" if warm.status == "oom" else f"peaked at {warm.peak_bytes / MiB:,.0f} MiB"
        raise ValueError(
            f"{_WHERE}: the step does not fit even at the warm-up batch size start={cfg.start}: it"
            f" {used}, the target is {room.target / MiB:,.0f} MiB (budget {room.budget / MiB:,.0f} MiB - headroom"
            f" {cfg.headroom / MiB:,.0f} MiB). Lower `start`, the headroom, or the step's memory."
        )
    return warm


def _probe_until_done(search: _Search, probe: _Prober, cfg: MaxBatchConfig, bar: Any) -> str:
    """Probe the sizes `search` asks for until it stops or `max_probes` ran; returns what limited the result."""
    while True:
        size, why = search.next_size()
        if size is None:
            return why
        if search.num_probes >= cfg.max_probes:
            return "max_probes"
        result = probe(size, cfg.calls_per_probe, "probe")
        search.probes.append(result)
        search.failures_in_a_row = 0 if result.ok else search.failures_in_a_row + 1
        bar.update(1)
        bar.set_postfix_str(f"{why} {size}: {result.status}")


def _result(
    search: _Search,
    memory: MemoryBackend,
    cfg: MaxBatchConfig,
    room: _Room,
    limited_by: str,
    *,
    enforced: bool,
    t_start: float,
) -> MaxBatchResult:
    """The result, with notes on memory that did not return to its baseline and on a probe-limited stop."""
    notes = list(room.notes)
    final = int(memory.allocated_bytes())
    returned = final <= search.baseline + memory.baseline_slack
    if not returned:
        notes.append(
            f"live memory did not return to its baseline: {final / MiB:,.1f} MiB after the search against"
            f" {search.baseline / MiB:,.1f} MiB after warm-up (does the step keep references to its batches?)"
        )
    lo = search.lo
    if limited_by == "max_probes":
        hi = search.hi
        notes.append(
            f"stopped after max_probes={cfg.max_probes}; the maximum lies in [{lo.size}, "
            f"{hi.size - 1 if hi else 'above'}]"
        )
    return MaxBatchResult(
        size=lo.size,
        model=search.model(),
        probes=search.probes,
        budget_bytes=int(room.budget),
        target_bytes=int(room.target),
        headroom_bytes=cfg.headroom,
        capacity_bytes=room.capacity,
        total_bytes=room.total,
        limited_by=limited_by,
        baseline_bytes=search.baseline,
        final_bytes=final,
        memory_returned=returned,
        backend=getattr(memory, "name", type(memory).__name__),
        seconds=time.perf_counter() - t_start,
        enforced=enforced,
        fitted_to="live" if search.live else "peak",
        allowance_bytes=int(search.target - search.safe_target),
        notes=notes,
    )
