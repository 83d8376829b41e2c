"""Model inputs: `InputSpec` (one input, static or with a dynamic min/opt/max profile) and shape checks.

A *profile* is a list of `InputSpec`s, one per forward argument. Several profiles can cover distinct shape
regimes (e.g. batch 1–8 and 9–64); the optimized module dispatches each call to the profile that contains it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from torchopt.config import DTYPES, ConfigBase, check_choice, check_type, parse_dtype

__all__ = [
    "WHICH",
    "InputSpec",
    "StructuredInputs",
    "bind_call",
    "check_call",
    "check_signature",
    "check_tied_sizes",
    "input_path",
    "input_tree",
    "is_structured",
    "normalize_profiles",
    "parse_input_spec",
    "select_profile",
]

# Profile points at which examples are drawn.
WHICH = ["min", "min+1", "opt", "max-1", "max"]

# torch.export and dynamo specialize a dim of size 0 or 1 to a constant: a dynamic dim stays symbolic only
# when traced at a size of at least this.
_MIN_SYMBOLIC_SIZE = 2


def _shape(name: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, torch.Size):
        value = tuple(value)
    check_type(name, value, (list, tuple), "a sequence of ints")
    for i, d in enumerate(value):
        check_type(f"{name}[{i}]", d, int)
        if d <= 0:
            raise ValueError(f"{name}[{i}] must be > 0, got {d} in {tuple(value)}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class InputSpec(ConfigBase):
    """One model input: a name, a dtype and a static `shape` or a dynamic `min`/`opt`/`max` profile.

    Dims where `min != max` are dynamic; `opt` is the size the backends tune for (default: the middle of the
    range). `dim_names` ties dynamic dims across inputs (e.g. ``{0: "batch"}`` on every input makes their batch
    dims one symbol). A spec is immutable and valid once built (1 <= min <= opt <= max on every dim): derive
    another with ``dataclasses.replace(spec, ...)``.

    Example::

        torchopt.InputSpec("x", min=(1, 3, 224, 224), opt=(8, 3, 224, 224), max=(32, 3, 224, 224))
        torchopt.InputSpec("input_ids", dtype="int64", min=(1, 16), opt=(4, 128), max=(8, 512),
                           value_range=(0, 30522))
    """

    name: str
    shape: tuple[int, ...] | None = None
    min: tuple[int, ...] | None = None
    opt: tuple[int, ...] | None = None
    max: tuple[int, ...] | None = None
    dtype: str = "float32"
    dim_names: dict[int, str] | None = None
    # Range of the random example values: floats are drawn uniformly, ints in [low, high).
    value_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        check_type("InputSpec.name", self.name, str)
        input_path(self.name)  # raises unless a forward argument, or a path into one
        where = f"InputSpec {self.name!r}"
        dtype = parse_dtype("dtype", self.dtype)
        shape = _shape(f"{where}.shape", self.shape)
        mins, opts, maxs = (_shape(f"{where}.{k}", getattr(self, k)) for k in ("min", "opt", "max"))
        if shape is not None:
            if any(v is not None for v in (mins, opts, maxs)):
                raise ValueError(f"{where}: give either shape=... or min/opt/max, not both")
            mins = opts = maxs = shape
        else:
            if mins is None or maxs is None:
                raise ValueError(f"{where}: needs shape=... or both min=... and max=... (opt optional)")
            if opts is None:
                opts = tuple(_default_opt(mn, mx) for mn, mx in zip(mins, maxs, strict=False))
        ranks = {"min": len(mins), "opt": len(opts), "max": len(maxs)}
        if len(set(ranks.values())) != 1:
            raise ValueError(f"{where}: min/opt/max must have the same rank, got ranks {ranks}")
        for i, (mn, op, mx) in enumerate(zip(mins, opts, maxs, strict=True)):
            if not mn <= op <= mx:
                raise ValueError(
                    f"{where}: dim {i} needs min <= opt <= max, got min={mn}, opt={op}, max={mx}"
                    f" (min={mins}, opt={opts}, max={maxs})"
                )
        self._set(dtype=dtype, min=mins, opt=opts, max=maxs, shape=mins if mins == maxs else None)
        if self.dim_names is not None:
            check_type(f"{where}.dim_names", self.dim_names, dict)
            self._set(dim_names={int(k): v for k, v in self.dim_names.items()})
            for d, n in self.dim_names.items():
                if not 0 <= d < len(self.min):
                    raise ValueError(f"{where}.dim_names: dim {d} is outside rank {len(self.min)}")
                if d not in self.dynamic_dims:
                    raise ValueError(f"{where}.dim_names: dim {d} is static (min == max), only dynamic dims are named")
                check_type(f"{where}.dim_names[{d}]", n, str)
        if self.value_range is not None:
            check_type(f"{where}.value_range", self.value_range, (list, tuple), "a (low, high) pair")
            lo, hi = self.value_range
            if not lo < hi:
                raise ValueError(f"{where}.value_range needs low < high, got {tuple(self.value_range)}")
            self._set(value_range=(lo, hi))

    def _set(self, **fields: Any) -> None:
        """Store normalized fields during `__post_init__` (the dataclass is frozen)."""
        for key, value in fields.items():
            object.__setattr__(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if self.shape is not None:  # static: keep the compact form
            d.update(min=None, opt=None, max=None)
        return {k: v for k, v in d.items() if v is not None}

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def rank(self) -> int:
        return len(self.min)

    @property
    def is_dynamic(self) -> bool:
        return self.min != self.max

    @property
    def dynamic_dims(self) -> list[int]:
        return [i for i, (a, b) in enumerate(zip(self.min, self.max, strict=True)) if a != b]

    def dim_name(self, dim: int) -> str:
        """Symbol name of a dynamic dim: from `dim_names` or unique per input and dim."""
        if self.dim_names and dim in self.dim_names:
            return self.dim_names[dim]
        return f"{self.name.replace('.', '_')}_dim{dim}"

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == self.rank and all(
            mn <= s <= mx for s, mn, mx in zip(shape, self.min, self.max, strict=True)
        )

    def check(self, value: Any) -> None:
        """Raise ValueError/TypeError if `value` does not fit this spec (naming input, dim, value, range)."""
        _check_tensor(self, value)
        shape = tuple(value.shape)
        if len(shape) != self.rank:
            raise ValueError(
                f"input {self.name!r} has rank {len(shape)} (shape {shape}), the profile expects rank {self.rank}"
                f" (min {self.min}, max {self.max})"
            )
        for i, (s, mn, mx) in enumerate(zip(shape, self.min, self.max, strict=True)):
            if not mn <= s <= mx:
                raise ValueError(
                    f"input {self.name!r} dim {i} is {s}, outside the profile range [{mn}, {mx}]"
                    f" (shape {shape}; profile min {self.min}, max {self.max})"
                )
        _check_dtype_kind(self, value)

    def shape_at(self, which: str) -> tuple[int, ...]:
        """The shape at a profile point: 'min', 'opt', 'max', or 'min+1' / 'max-1' (dynamic dims moved one
        step inside the range, where dynamo's size specializations end)."""
        check_choice("which", which, WHICH)
        if which in ("min", "opt", "max"):
            return getattr(self, which)
        base, step = (self.min, 1) if which == "min+1" else (self.max, -1)
        return tuple(
            min(mx, max(mn, b + step)) if mn != mx else b for b, mn, mx in zip(base, self.min, self.max, strict=True)
        )

    @property
    def export_shape(self) -> tuple[int, ...]:
        """The shape export and compilers trace at: opt with every dynamic dim raised to at least 2, where
        tracing keeps it symbolic (a dynamic dim has max > min >= 1, so 2 is inside its range)."""
        dynamic = self.dynamic_dims
        return tuple(max(_MIN_SYMBOLIC_SIZE, o) if d in dynamic else o for d, o in enumerate(self.opt))

    def symbolic_dims(self, which: str) -> list[int]:
        """The dynamic dims that tracing at a profile point (see `shape_at`) can keep symbolic: those of size
        >= 2 there (a size of 1 specializes)."""
        shape = self.shape_at(which)
        return [d for d in self.dynamic_dims if shape[d] >= _MIN_SYMBOLIC_SIZE]

    def example(self, which: str = "opt", device: torch.device | str | None = None, *, seed: int | None = None):
        """A random tensor at a profile point (see `shape_at`); seeded when `seed` is given."""
        shape = self.shape_at(which)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        dt = self.torch_dtype
        if dt.is_floating_point:
            lo, hi = self.value_range or (-1.0, 1.0)
            t = torch.rand(shape, generator=gen) * (hi - lo) + lo
        elif dt == torch.bool:
            t = torch.rand(shape, generator=gen) > 0.5
        else:
            lo, hi = self.value_range or (0, 256 if dt == torch.uint8 else 100)
            t = torch.randint(int(lo), int(hi), shape, generator=gen)
        return t.to(device=device, dtype=dt)


def _default_opt(low: int, high: int) -> int:
    """The opt of a dim given only its range (by `InputSpec` and by a ``MIN-MAX`` dim of a CLI spec): the
    middle, rounded up. Torch-TensorRT's own default (min + max) / 2 can exceed max on odd ranges; this one
    stays <= `high` (on an invalid range min > max it is `high`, so the error shows min > max)."""
    return min(high, (low + high + 1) // 2)


def normalize_profiles(inputs: Any) -> list[list[InputSpec]]:
    """Accept an InputSpec, a list of them (one profile), or a list of lists (several profiles)."""
    if isinstance(inputs, InputSpec):
        return [[inputs]]
    if isinstance(inputs, Mapping):
        inputs = [inputs]
    check_type("inputs", inputs, (list, tuple), "an InputSpec, a list of InputSpecs or a list of profiles")
    if not inputs:
        raise ValueError("inputs must name at least one InputSpec, got an empty list")
    if all(isinstance(p, (list, tuple)) for p in inputs):
        profiles = [[_as_spec(s, f"inputs[{i}][{j}]") for j, s in enumerate(p)] for i, p in enumerate(inputs)]
    else:
        profiles = [[_as_spec(s, f"inputs[{j}]") for j, s in enumerate(inputs)]]
    names = [s.name for s in profiles[0]]
    for i, prof in enumerate(profiles):
        if not prof:
            raise ValueError(f"inputs profile {i} is empty")
        pn = [s.name for s in prof]
        if len(set(pn)) != len(pn):
            raise ValueError(f"inputs profile {i} names an input twice: {pn}")
        if pn != names:
            raise ValueError(f"every profile must name the same inputs in order: profile 0 has {names}, {i} has {pn}")
        for s, s0 in zip(prof, profiles[0], strict=True):
            if s.rank != s0.rank or s.dtype != s0.dtype:
                raise ValueError(f"input {s.name!r} differs in rank or dtype between profile 0 and profile {i}")
    input_tree(profiles[0])  # dotted names must describe one structure
    _check_no_overlap(profiles)
    for i, prof in enumerate(profiles):
        _check_tied_dims(prof, i)
    return profiles


def _check_tied_dims(profile: list[InputSpec], index: int) -> None:
    """Dims that share a name must share min/opt/max, or the examples and the backends disagree."""
    seen: dict[str, tuple[str, int, tuple[int, int, int]]] = {}
    for s in profile:
        for d in s.dynamic_dims:
            rng = (s.min[d], s.opt[d], s.max[d])
            name = s.dim_name(d)
            if name in seen and seen[name][2] != rng:
                other, od, orng = seen[name]
                raise ValueError(
                    f"profile {index}: dim {name!r} is shared by {other!r} dim {od} with min/opt/max {orng}"
                    f" and {s.name!r} dim {d} with {rng}; shared dims need the same range"
                )
            seen.setdefault(name, (s.name, d, rng))


def _as_spec(value: Any, where: str) -> InputSpec:
    if isinstance(value, InputSpec):
        return value
    if isinstance(value, Mapping):
        return InputSpec.from_dict(dict(value), where=where)
    if isinstance(value, str):
        return parse_input_spec(value)
    raise TypeError(f"{where} must be an InputSpec, a dict or a spec string, got {type(value).__name__} {value!r}")


def _check_no_overlap(profiles: list[list[InputSpec]]) -> None:
    for i in range(len(profiles)):
        for j in range(i + 1, len(profiles)):
            overlap = all(
                all(max(a0, b0) <= min(a1, b1) for a0, a1, b0, b1 in zip(a.min, a.max, b.min, b.max, strict=True))
                for a, b in zip(profiles[i], profiles[j], strict=True)
            )
            if overlap:
                ranges = [(s.name, s.min, s.max) for s in profiles[i] + profiles[j]]
                raise ValueError(f"profiles {i} and {j} overlap (a shape would fit both): {ranges}")


def check_call(profiles: list[list[InputSpec]], inputs: Sequence[Any], device: torch.device | None = None) -> int:
    """The index of the profile a call's inputs (flat, in the profile's order) fit; the one check of a call.

    Each input must be a tensor, on `device`'s type when one is given; its shape picks the profile (a clear
    error naming the input, dim, value and range when none fits, or when dims tied by `dim_names` differ);
    floating inputs go to floating specs and integer or bool inputs to the others.
    """
    for spec, value in zip(profiles[0], inputs, strict=True):
        _check_tensor(spec, value)
        if device is not None and value.device.type != device.type:
            raise ValueError(
                f"input {spec.name!r} is on {value.device}, the optimized module runs on {device};"
                f" move it with .to({str(device)!r})"
            )
    index = select_profile(profiles, inputs)
    for spec, value in zip(profiles[index], inputs, strict=True):
        _check_dtype_kind(spec, value)
    return index


def _check_tensor(spec: InputSpec, value: Any) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"input {spec.name!r} must be a torch.Tensor, got {type(value).__name__}")


def _check_dtype_kind(spec: InputSpec, value: torch.Tensor) -> None:
    """Floating and non-floating dtypes do not mix (the compute dtype casts floats only)."""
    if value.is_floating_point() != spec.torch_dtype.is_floating_point:
        raise TypeError(f"input {spec.name!r} has dtype {value.dtype}, the spec expects {spec.dtype}")


def select_profile(profiles: list[list[InputSpec]], args: Sequence[torch.Tensor]) -> int:
    """Index of the profile that contains every argument's shape; a clear ValueError when none does, or when
    dims tied by `dim_names` have different sizes."""
    index = next(
        (
            i
            for i, prof in enumerate(profiles)
            if all(s.contains(tuple(a.shape)) for s, a in zip(prof, args, strict=True))
        ),
        None,
    )
    if index is not None:
        check_tied_sizes(profiles[index], args)
        return index
    if len(profiles) == 1:
        for s, a in zip(profiles[0], args, strict=True):
            s.check(a)  # raises with the dim, value and range
    shapes = {s.name: tuple(a.shape) for s, a in zip(profiles[0], args, strict=True)}
    ranges = [{s.name: (s.min, s.max) for s in p} for p in profiles]
    raise ValueError(f"input shapes {shapes} fit none of the {len(profiles)} profiles: {ranges}")


def check_tied_sizes(profile: list[InputSpec], args: Sequence[torch.Tensor]) -> None:
    """Dims tied by `dim_names` (one symbol for the backends) must have the same size in one call."""
    seen: dict[str, tuple[str, int, int]] = {}
    for s, a in zip(profile, args, strict=True):
        for d, name in (s.dim_names or {}).items():
            size = int(a.shape[d])
            other, od, osize = seen.setdefault(name, (s.name, d, size))
            if osize != size:
                raise ValueError(
                    f"input {other!r} dim {od} is {osize} but input {s.name!r} dim {d} is {size}; both are the"
                    f" dim {name!r} (InputSpec.dim_names) and must have the same size"
                )


def input_path(name: str) -> tuple[str | int, ...]:
    """The path an InputSpec name denotes: ``"x"`` → ``("x",)`` (a forward argument), ``"batch.input_ids"`` →
    ``("batch", "input_ids")`` (a key of a dict argument), ``"pair.1"`` → ``("pair", 1)`` (a list position)."""
    parts = name.split(".")
    if not parts[0].isidentifier() or not all(p.isidentifier() or _POSITION_RE.match(p) for p in parts[1:]):
        raise ValueError(
            "InputSpec.name must be a forward argument's name or a dotted path into one (dict keys that are"
            f" identifiers, list positions 0, 1, ...), e.g. 'x', 'batch.input_ids', 'pair.0'; got {name!r}"
        )
    return (parts[0], *(int(p) if _POSITION_RE.match(p) else p for p in parts[1:]))


_POSITION_RE = re.compile(r"^(0|[1-9][0-9]*)$")

# The nesting the specs' paths declare: {root: node}, a node being a spec index (a tensor leaf) or a dict of
# children (str keys: a dict argument; int keys 0..n-1: a list argument).
InputTree = dict[Any, Any]


def input_tree(profile: list[InputSpec]) -> InputTree:
    """The argument structure the profile's spec names declare; ValueError when the paths contradict."""
    tree: InputTree = {}
    for index, spec in enumerate(profile):
        *parents, last = input_path(spec.name)
        node = tree
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                prefix = ".".join(map(str, parents[: depth + 1]))
                raise ValueError(
                    f"InputSpec {spec.name!r} reaches into {prefix!r}, which another InputSpec names as a tensor"
                )
        if last in node:
            raise ValueError(f"InputSpec {spec.name!r} names a tensor where other InputSpecs name its contents")
        node[last] = index
    _check_containers(tree, "")
    return tree


def _check_containers(node: InputTree, where: str) -> None:
    for key, child in node.items():
        if not isinstance(child, dict):
            continue
        path = f"{where}{key}"
        positions = [k for k in child if isinstance(k, int)]
        if positions and len(positions) != len(child):
            raise ValueError(f"inputs under {path!r} mix dict keys and list positions: {list(child)}")
        if positions and sorted(positions) != list(range(len(positions))):
            raise ValueError(f"inputs under {path!r} name list positions {sorted(positions)}; they must be 0..n-1")
        _check_containers(child, f"{path}.")


def is_structured(profile: list[InputSpec]) -> bool:
    """Whether some input is a tensor inside a dict or list argument (a dotted spec name)."""
    return any("." in s.name for s in profile)


class StructuredInputs(torch.nn.Module):
    """Wraps a model whose forward takes dicts or lists of tensors: the wrapper takes the tensors flat, in
    the profile's order, and rebuilds the arguments (dicts for key paths, lists for positions), so that
    compilers, export and saving see a plain positional module."""

    def __init__(self, model: torch.nn.Module, profile: list[InputSpec]):
        super().__init__()
        self.model = model
        self.tree = input_tree(profile)

    def forward(self, *leaves: torch.Tensor) -> Any:
        return self.model(*(_rebuild(node, leaves) for node in self.tree.values()))


def _rebuild(node: Any, leaves: Sequence[torch.Tensor]) -> Any:
    if not isinstance(node, dict):
        return leaves[node]
    if all(isinstance(k, int) for k in node):
        return [_rebuild(node[i], leaves) for i in range(len(node))]
    return {k: _rebuild(v, leaves) for k, v in node.items()}


def _flatten(value: Any, node: Any, where: str, out: dict[int, Any]) -> None:
    """Put the tensors of an argument into `out` by spec index, checking its structure against `node`."""
    if not isinstance(node, dict):
        out[node] = value
        return
    if all(isinstance(k, int) for k in node):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"input {where!r} must be a list or tuple of {len(node)} items, got {type(value).__name__}")
        if len(value) != len(node):
            raise ValueError(f"input {where!r} has {len(value)} items, the InputSpecs name {len(node)}")
        for i, item in enumerate(value):
            _flatten(item, node[i], f"{where}.{i}", out)
        return
    if not isinstance(value, Mapping):
        raise TypeError(f"input {where!r} must be a dict with keys {list(node)}, got {type(value).__name__}")
    missing, extra = [k for k in node if k not in value], [k for k in value if k not in node]
    if missing or extra:
        raise ValueError(
            f"input {where!r} has keys {list(value)}, the InputSpecs name {list(node)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; no InputSpec for {extra} (add one, e.g. '{where}.{extra[0]}', or drop the key)" if extra else "")
        )
    for k, sub in node.items():
        _flatten(value[k], sub, f"{where}.{k}", out)


def _forward_params(model: torch.nn.Module) -> list[inspect.Parameter]:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    return list(sig.parameters.values())


def check_signature(model: torch.nn.Module, profile: list[InputSpec]) -> None:
    """Check that the specs name the forward arguments in order and cover every required one.

    A forward that takes exactly one positional argument takes one spec whatever its name (the call binds it
    by position); names matter where they say which of several arguments an input is.
    """
    params = _forward_params(model)
    if not params or any(p.kind == p.VAR_POSITIONAL for p in params):
        return  # *args forward: nothing to check by name
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in positional]
    given = list(input_tree(profile))
    if len(given) == 1 and len(names) == 1:
        return
    if len(given) > len(names):
        raise ValueError(
            f"inputs name {len(given)} inputs {given}, but {type(model).__name__}.forward takes"
            f" {len(names)} positional arguments {names}"
        )
    for i, (g, n) in enumerate(zip(given, names, strict=False)):
        if g != n:
            raise ValueError(
                f"inputs[{i}] is named {g!r} but {type(model).__name__}.forward's argument {i} is {n!r};"
                f" expected inputs named {names[: len(given)]}"
            )
    missing = [p.name for p in positional[len(given) :] if p.default is inspect.Parameter.empty]
    if missing:
        raise ValueError(f"inputs do not cover required forward arguments {missing} of {type(model).__name__}")


def bind_call(profile: list[InputSpec], args: tuple, kwargs: dict) -> list[Any]:
    """Map a call's positional and keyword arguments onto the profile's inputs, in the profile's order.

    Arguments are the specs' root names (``batch`` for ``batch.input_ids``); a dict or list argument is
    flattened into its tensors, and its keys / length must be exactly those the specs name.
    """
    tree = input_tree(profile)
    names = list(tree)
    if len(args) > len(names):
        raise TypeError(f"expected at most {len(names)} inputs {names}, got {len(args)} positional arguments")
    bound: dict[str, Any] = dict(zip(names, args, strict=False))
    for k, v in kwargs.items():
        if k not in names:
            raise TypeError(f"unexpected input {k!r}; the inputs are {names}")
        if k in bound:
            raise TypeError(f"input {k!r} given twice (positionally and by name)")
        bound[k] = v
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"missing inputs {missing}; the inputs are {names}")
    leaves: dict[int, Any] = {}
    for name, node in tree.items():
        _flatten(bound[name], node, name, leaves)
    return [leaves[i] for i in range(len(profile))]


_SPEC_RE = re.compile(r"^(?P<name>[A-Za-z_]\w*)(?::(?P<dtype>\w+))?=(?P<shape>.+)$")


def parse_input_spec(text: str) -> InputSpec:
    """Parse a CLI spec: ``name[:dtype]=D0xD1x...`` where a dim is ``N`` or ``MIN-OPT-MAX`` / ``MIN-MAX``.

    Example: ``x=1-8-32x3x224x224``, ``ids:int64=1-4-8x16-128-512``.
    """
    check_type("input spec", text, str)
    m = _SPEC_RE.match(text.strip())
    if not m:
        raise ValueError(
            f"input spec {text!r} is not of the form name[:dtype]=DIMxDIMx..., a DIM being N or MIN-OPT-MAX"
            " (e.g. 'x=1-8-32x3x224x224')"
        )
    mins, opts, maxs = [], [], []
    for part in m["shape"].split("x"):
        nums = part.split("-")
        if not all(n.isdigit() for n in nums) or len(nums) not in (1, 2, 3):
            raise ValueError(f"input spec {text!r}: dim {part!r} must be N, MIN-MAX or MIN-OPT-MAX")
        vals = [int(n) for n in nums]
        lo, hi = vals[0], vals[-1]
        mid = vals[1] if len(vals) == 3 else (lo if len(vals) == 1 else _default_opt(lo, hi))
        mins.append(lo)
        opts.append(mid)
        maxs.append(hi)
    return InputSpec(m["name"], min=tuple(mins), opt=tuple(opts), max=tuple(maxs), dtype=m["dtype"] or "float32")
