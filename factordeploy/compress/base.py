"""The method interface and registry.

A method is a class with a name, a one-line summary, its own CLI options, and
`compress(model, targets, ctx) -> CompressResult`. Methods live one per module in
`compress/methods/` and register themselves with `@register`; the CLI builds its flags
from `Method.options`, so adding a method touches compress/ only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import UserError
from ..models.shape import ModelShape
from ..ranges import INT32, ModelLimit
from .layers import describe_layer, layer_bytes
from .targets import get_module, set_module


@dataclass(frozen=True)
class MethodOption:
    """A method-specific option: `--{name}` (dashes) on the CLI, ctx.options[name with underscores].

    CLI-neutral: a Python type, optional allowed values (`choices` for strings, `one_of` for ints) and
    bounds, and `limit`, the bound that depends on the model (a ranges.ModelLimit, checked by
    `Method.validate` before any weight is loaded). This spec is the one place the option's range lives:
    cli.py maps it to a ranges.py click type, `check` validates library callers the same way."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    multiple_of: int | None = None  # ints with a divisibility rule (e.g. SparseGPT blocks of 4 columns)
    one_of: tuple[int, ...] | None = None  # ints from a fixed set (e.g. --bits 2/4/8)
    limit: ModelLimit | None = None  # the model-dependent upper bound (dictionary size <= widest linear, ...)
    path: str | None = None  # str options naming a path: "in" (read) or "out" (a folder written, e.g. a checkpoint)

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    def check(self, value: Any) -> Any:
        """`value` converted to the option's type; UserError naming the flag when it is not allowed."""
        if value is None:
            return None
        try:
            v = self.type(value)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"--{self.name} must be {self.type.__name__}, got {value!r}", self.help) from None
        hi = self.upper
        bad = ((self.choices is not None and v not in self.choices)
               or (self.type is float and not math.isfinite(v))
               or (self.min is not None and (v < self.min or (self.min_open and v == self.min)))
               or (hi is not None and v > hi)
               or (self.multiple_of is not None and v % self.multiple_of)
               or (self.one_of is not None and v not in self.one_of))
        if bad:
            raise UserError(f"--{self.name} {value!r} is not allowed", f"use {self.allowed()}")
        return v

    @property
    def upper(self) -> float | None:
        """The declared max; every int is capped at INT32 (sizes and counts reach torch as int32/int64)."""
        return min(self.max, INT32) if self.type is int and self.max is not None else INT32 if self.type is int else self.max

    def allowed(self) -> str:
        if self.choices is not None:
            return ", ".join(self.choices)
        if self.one_of is not None:
            return ", ".join(map(str, self.one_of))
        parts = ([] if self.min is None else [f"{'>' if self.min_open else '>='} {self.min}"]) + \
            ([] if self.upper is None else [f"<= {self.upper}"])
        return ("a finite number " if self.type is float else "an integer " if self.type is int else "") + \
            " and ".join(parts) + (f", a multiple of {self.multiple_of}" if self.multiple_of else "")


@dataclass
class CompressContext:
    """Everything a method may need besides the model: budget, device, seed, options, data."""

    ratio: float
    device: str = "cpu"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    calibration: Any = None  # compress.calibration.Calibration, built lazily by the build
    plan: dict[str, Any] = field(default_factory=dict)  # block-wise runs: global decisions (Method.plan)
    # how quantized factors are stored (compress/quant.QuantSpec fields but bits): block, symmetric, algo, grid
    quant: dict[str, Any] = field(default_factory=lambda: {"block": 32, "symmetric": True, "algo": "rtn",
                                                           "grid": "signed"})

    def opt(self, key: str, default: Any = None) -> Any:
        v = self.options.get(key)
        return default if v is None else v

    def require_calibration(self):
        if self.calibration is None:
            raise UserError("this method needs calibration data", "run it through `deploy build` or pass a Calibration")
        return self.calibration


@dataclass
class LayerRecord:
    """What happened to one targeted layer."""

    name: str
    before: dict
    after: dict
    bytes_before: int
    bytes_after: int
    metrics: dict = field(default_factory=dict)


@dataclass
class CompressResult:
    layers: list[LayerRecord]
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)


class Method:
    """Base class for compression methods."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[MethodOption, ...]] = ()
    needs_calibration: ClassVar[bool] = False

    def uses_calibration(self, options: dict[str, Any]) -> bool:
        """Whether this run needs calibration data; options can switch it on (e.g. fine-tuning)."""
        return self.needs_calibration

    def check_options(self, options: dict[str, Any]) -> None:
        """Reject bad option values (paths, files) before any work; UserError with a fix."""

    # -- block-wise compression (compress/sequential.py: --calib-mode, --reconstruct-steps) --
    blockwise: ClassVar[bool] = True  # False: the method fits all layers jointly (compress one unit = wrong)
    default_calib_mode: ClassVar[str] = "original"  # what --calib-mode auto means for this method

    def sequential_unit(self, options: dict[str, Any]) -> int:
        """Consecutive blocks compressed together (e.g. blocks sharing one dictionary)."""
        return 1

    def plan(self, model: nn.Module, targets: list[str], ctx: "CompressContext") -> dict[str, Any] | None:
        """Global decisions made once on the ORIGINAL statistics before a block-wise run (e.g. ranks
        allocated across all layers); the result is `ctx.plan` for every unit's `compress`."""
        return None

    def validate(self, options: dict[str, Any], shape: ModelShape) -> None:
        """Reject option values the MODEL cannot take: the build calls this right after config.json is read,
        before weights, calibration or any compression work (config.check_model_limits). The default checks
        every option's declared `limit` (dictionary sizes vs the widths, block counts vs the depth, ...);
        a method with further rules extends it. `options` are already range-checked (MethodOption.check)."""
        for o in self.options:
            if o.limit is not None:
                o.limit.check(f"--{o.name}", options.get(o.key), shape)

    def validate_model(self, model: nn.Module, targets: list[str], options: dict[str, Any]) -> None:
        """Rules that need the targeted layers themselves (their exact shapes): the build calls this once the
        targets are found and before calibration (stages.load); UserError with a fix."""

    def compress(self, model: nn.Module, targets: list[str], ctx: CompressContext) -> CompressResult:
        raise NotImplementedError


def replace_layer(model: nn.Module, name: str, new: nn.Module | None, metrics: dict | None = None) -> LayerRecord:
    """Swap one targeted layer (None = keep it dense) and return its record."""
    old = get_module(model, name)
    before, bytes_before = describe_layer(old), layer_bytes(old)
    if new is not None:
        set_module(model, name, new)
    cur = get_module(model, name)
    return LayerRecord(name, before, describe_layer(cur), bytes_before, layer_bytes(cur), metrics or {})


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS[cls.name] = cls
    return cls


def _discover() -> None:
    import importlib
    import pkgutil

    from . import methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


def all_methods() -> dict[str, type[Method]]:
    _discover()
    return dict(sorted(METHODS.items()))


def get_method(name: str) -> Method:
    methods = all_methods()
    if name not in methods:
        raise UserError(f"unknown method '{name}'", f"use one of: {', '.join(methods)} (see `deploy methods`)")
    return methods[name]()


def method_options(method: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's declared defaults overlaid with `given` (None = not given); foreign keys rejected."""
    m = get_method(method)
    declared = {o.key: o for o in m.options}
    given = {k.replace("-", "_"): v for k, v in (given or {}).items() if v is not None}
    foreign = sorted(k for k in given if k not in declared)
    if foreign:
        raise UserError(f"option(s) {', '.join('--' + k.replace('_', '-') for k in foreign)} do not apply to method '{method}'",
                        f"see `deploy methods` for what {method} takes")
    options = {k: o.default for k, o in declared.items()} | {k: declared[k].check(v) for k, v in given.items()}
    m.check_options(options)
    return options


def all_options() -> list[MethodOption]:
    """Union of every method's options (same name must mean the same flag)."""
    seen: dict[str, MethodOption] = {}
    for cls in all_methods().values():
        for o in cls.options:
            if o.name in seen and seen[o.name] != o:
                prev = seen[o.name]
                if (prev.type, prev.default) != (o.type, o.default):
                    raise RuntimeError(f"option --{o.name} declared differently by two methods")
                continue
            seen[o.name] = o
    return list(seen.values())


def move_to(t: torch.Tensor, device: str) -> torch.Tensor:
    return t.to(device) if str(t.device) != device else t


ProgressFn = Callable[[str], None]
