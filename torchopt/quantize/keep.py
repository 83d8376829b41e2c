"""Layer-precision overrides: keep modules out of quantization, by glob on module names, by module type, or as the
layers that read the model's input.

A `KeepRule` selects modules by ``pattern`` (``fnmatch`` glob on ``model.named_modules()`` names, e.g.
``"conv1"``, ``"*head*"``, ``"layer4.*"``), by ``module_type`` (a class name such as ``"LayerNorm"``,
``"nn.Linear"``, ``"torch.nn.Conv2d"`` or a user class; subclasses match) or with ``reads_input: true``: the layers
(modules with weights and no children) that receive one of the model's input tensors itself on the first
calibration batch, such as an image stem or a patch embedding. A kept module and everything under it get no Q/DQ.
``precision`` says what the kept module runs in:

- ``auto``: the model's own dtype (float32, or what a ``cast`` step chose);
- ``fp32`` / ``fp16`` / ``bf16`` (or ``float32`` / ``float16`` / ``bfloat16`` and the other names
  `torchopt.config.parse_dtype` reads, e.g. ``half``): the module's parameters are cast and forward hooks cast
  its floating inputs to that dtype and its outputs back, so the exported graph (and a strongly typed TensorRT
  network) runs the layer in that precision.

A rule that selects nothing is an error naming the rule and the nearest module names (or the module types the
model has), unless it says ``optional: true``: the rule sets of the built-in transformer recipes
(``int8-ptq-transformer``, ``fp8-ptq-transformer``) name layers not every model has (a pooler, a classifier head).
When rules overlap, the later rule's precision wins, like ModelOpt's ordered ``quant_cfg``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any

import torch

from torchopt.config import DTYPES, FLOAT_DTYPES, ConfigBase, check_choice, check_type, parse_dtype

__all__ = ["KEEP_PRECISIONS", "KeepRule", "KeptModule", "apply_keep_precision", "check_precision", "resolve_keep"]

# The spelling a kept layer's precision is stored under (in the config, the summary, the report and the
# calibration cache key); any spelling of these dtypes that torchopt.config.parse_dtype reads is accepted.
_STORED_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
KEEP_PRECISIONS: dict[str, torch.dtype | None] = {
    "auto": None,
    **{_STORED_NAMES[name]: DTYPES[name] for name in FLOAT_DTYPES},
}


def check_precision(value: Any, where: str) -> str:
    """The stored precision name ('auto', 'fp32', 'fp16', 'bf16') for 'auto' or any name of a float dtype in
    torchopt's dtype vocabulary ('float16', 'half', 'fp16', ...: `torchopt.config.parse_dtype`)."""
    check_type(where, value, str)
    if value == "auto":
        return value
    try:
        return _STORED_NAMES[parse_dtype(where, value, FLOAT_DTYPES)]
    except ValueError:
        check_choice(where, value, list(KEEP_PRECISIONS))  # not a float dtype: name the stored spellings
        raise


@dataclasses.dataclass
class KeepRule(ConfigBase):
    """Keep the selected modules unquantized (see the module docstring).

    Example::

        KeepRule(pattern="conv1", precision="fp16")
        KeepRule(module_type="LayerNorm")            # every LayerNorm, at the model's dtype
        KeepRule(pattern="*head*", precision="fp32", reason="classifier is sensitive")
        KeepRule(pattern="*pooler*", optional=True)  # selecting nothing is no error

    `reason` is what the summary and the optimize report say about the kept modules (default: the rule itself).
    """

    pattern: str | None = None
    module_type: str | None = None
    reads_input: bool = False
    precision: str = "auto"
    reason: str = ""
    optional: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.module_type, type):
            cls = self.module_type
            self.module_type = f"{cls.__module__}.{cls.__qualname__}"
        check_type("keep.reads_input", self.reads_input, bool)
        chosen = {k: v for k, v in self._selectors().items() if v not in (None, False)}
        if len(chosen) > 1:
            given = ", ".join(f"{k}={v!r}" for k, v in chosen.items())
            raise ValueError(
                f"a keep rule takes one of 'pattern' (glob on module names), 'module_type' or 'reads_input', got"
                f" {len(chosen)}: {given}"
            )
        if self.pattern is not None:
            check_type("keep.pattern", self.pattern, str, "a glob on module names (e.g. 'conv1', '*head*')")
            if not self.pattern:
                raise ValueError("keep.pattern must not be empty")
        if self.module_type is not None:
            check_type("keep.module_type", self.module_type, str, "a module class name (e.g. 'LayerNorm')")
        self.precision = check_precision(self.precision, "keep.precision")
        check_type("keep.reason", self.reason, str)
        check_type("keep.optional", self.optional, bool)

    @classmethod
    def coerce(cls, value: Any, where: str = "keep") -> KeepRule:
        """A rule from a rule, a dict or a plain pattern string."""
        if isinstance(value, KeepRule):
            return value
        if isinstance(value, str):
            return cls(pattern=value)
        if isinstance(value, type) and issubclass(value, torch.nn.Module):
            return cls(module_type=value)
        if isinstance(value, dict):
            return cls.from_dict(value, where=where)
        raise TypeError(
            f"{where} must be a KeepRule, a {{pattern: ..., precision: ...}} mapping, a module-name glob or a"
            f" module class, got {type(value).__name__} {value!r}"
        )

    def _selectors(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "module_type": self.module_type, "reads_input": self.reads_input}

    def check_selects(self, where: str = "keep") -> None:
        """ValueError unless the rule selects something (a default-constructed rule does not)."""
        if self.pattern is None and self.module_type is None and not self.reads_input:
            raise ValueError(
                f"{where} needs 'pattern' (glob on module names, e.g. 'conv1', '*head*'), 'module_type'"
                " (e.g. 'LayerNorm') or 'reads_input: true', got none"
            )

    def describe(self) -> str:
        if self.reads_input:
            return "keep rule reads_input"
        what = f"pattern {self.pattern!r}" if self.pattern is not None else f"module_type {self.module_type!r}"
        return f"keep rule {what}"


@dataclasses.dataclass
class KeptModule:
    """A module a keep rule selected: its name, the precision it runs in, and why."""

    name: str
    precision: str
    why: str


def _type_matches(module: torch.nn.Module, wanted: str) -> bool:
    """Whether the module is of the type named `wanted` (or a subclass), or stands for one: a module that replaced
    a torch module in place (`ExplicitAttention` for nn.MultiheadAttention) names it in ``stands_for``."""
    short = wanted.removeprefix("torch.").removeprefix("nn.")
    for cls in (*type(module).__mro__, *getattr(module, "stands_for", ())):
        full = f"{cls.__module__}.{cls.__qualname__}"
        if wanted in (cls.__name__, full) or (cls.__module__.startswith("torch.nn") and short == cls.__name__):
            return True
    return False


def _user_types(model: torch.nn.Module) -> list[str]:
    return sorted({type(m).__name__ for _, m in model.named_modules()})


def _not_found(
    rule: KeepRule, index: int, names: list[str], model: torch.nn.Module, readers: set[str] | None
) -> ValueError:
    if rule.reads_input:
        if readers is None:
            return ValueError(
                f"keep[{index}]: reads_input needs a calibration batch the quantize step can run by itself, and"
                " calib_data is a callable; name the input layers with 'pattern' instead"
            )
        return ValueError(
            f"keep[{index}]: reads_input selects no layer: no module with weights received one of the model's input"
            " tensors on the first calibration batch (an input that forward normalizes or casts first reaches the"
            " layers as another tensor); name the layer with 'pattern' instead"
        )
    if rule.pattern is not None:
        stem = rule.pattern.replace("*", "").replace("?", "") or rule.pattern
        near = difflib.get_close_matches(stem, names, n=5, cutoff=0.4)
        if not near:  # try the last dotted component: 'haed' vs 'model.head'
            tails = {n.rsplit(".", 1)[-1]: n for n in names}
            near = [tails[t] for t in difflib.get_close_matches(stem, list(tails), n=5, cutoff=0.4)]
        listing = f"nearby module names: {near}" if near else f"module names include: {names[:12]}"
        return ValueError(f"keep[{index}]: pattern {rule.pattern!r} matches no module of the model; {listing}")
    types = _user_types(model)
    near = difflib.get_close_matches(rule.module_type.rsplit(".", 1)[-1], types, n=3, cutoff=0.5)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ValueError(
        f"keep[{index}]: module_type {rule.module_type!r} matches no module of the model{hint}; the model's"
        f" module types: {types}"
    )


def resolve_keep(
    model: torch.nn.Module, rules: list[KeepRule], input_readers: set[str] | None = None
) -> dict[str, KeptModule]:
    """Module name → `KeptModule` for every module the rules select (descendants included).

    input_readers: the layers that read a model input (`torchopt.quantize.calibrate.FirstBatch`), for
        ``reads_input`` rules; None where it could not be seen (they then select nothing).

    Raises ValueError for a rule that selects nothing (unless it is ``optional``), naming the rule and the nearest
    module names.
    """
    names = [n for n, _ in model.named_modules() if n]  # the root is never "kept": that is no quantization
    modules = dict(model.named_modules())
    kept: dict[str, KeptModule] = {}
    for i, rule in enumerate(rules):
        rule.check_selects(f"keep[{i}]")
        if rule.reads_input:
            hits = [n for n in names if n in (input_readers or ())]
        elif rule.pattern is not None:
            hits = [n for n in names if fnmatch.fnmatchcase(n, rule.pattern)]
        else:
            hits = [n for n in names if _type_matches(modules[n], rule.module_type)]
        if not hits:
            if rule.optional:
                continue
            raise _not_found(rule, i, names, model, input_readers)
        why = rule.reason or f"{rule.describe()} (keep[{i}])"
        for hit in hits:
            kept[hit] = KeptModule(hit, rule.precision, why)
    # Descendants of a kept module are unquantized too; list them so the summary can say why.
    for name in list(kept):
        for other in names:
            if other.startswith(name + ".") and other not in kept:
                kept[other] = KeptModule(other, "auto", f"inside kept module {name!r}")
    return dict(sorted(kept.items(), key=lambda kv: names.index(kv[0])))


def top_level(kept: dict[str, KeptModule]) -> list[str]:
    """Kept module names that are not inside another kept module (one quant_cfg entry covers the subtree)."""
    out: list[str] = []
    for name in kept:  # parents come before children in named_modules order
        if not any(name.startswith(p + ".") for p in out):
            out.append(name)
    return out


class _PrecisionCast:
    """Forward hooks running one module in `dtype`: cast floating inputs in, outputs back to the caller's dtype.

    A module-level class (not a closure) so that modules carrying the hooks still pickle and deep-copy.
    """

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self._stack: list[torch.dtype] = []  # the caller's dtype per nested call

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(dtype) if value.is_floating_point() else value
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(self._cast(v, dtype) for v in value)
        if isinstance(value, dict):
            return {k: self._cast(v, dtype) for k, v in value.items()}
        return value

    def _first_float(self, values: Any) -> torch.dtype | None:
        for v in values:
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v.dtype
        return None

    def pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        caller = self._first_float([*args, *kwargs.values()]) or self.dtype
        self._stack.append(caller)
        return self._cast(args, self.dtype), self._cast(kwargs, self.dtype)

    def post(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        caller = self._stack.pop() if self._stack else self.dtype
        return self._cast(output, caller)


def apply_keep_precision(model: torch.nn.Module, kept: dict[str, KeptModule]) -> list[str]:
    """Cast the kept modules whose precision is not 'auto' and install the casting hooks; the names changed.

    Parents are handled before children, so ``keep: [{pattern: layer1, precision: fp32},
    {pattern: layer1.0.conv1, precision: fp16}]`` runs ``layer1`` in fp32 except that conv in fp16.
    """
    modules = dict(model.named_modules())
    changed = []
    for name, item in kept.items():
        dtype = KEEP_PRECISIONS[item.precision]
        if dtype is None:
            continue
        module = modules[name]
        module.to(dtype)
        cast = _PrecisionCast(dtype)
        module.register_forward_pre_hook(cast.pre, with_kwargs=True)
        module.register_forward_hook(cast.post, with_kwargs=True)
        changed.append(name)
    return changed
