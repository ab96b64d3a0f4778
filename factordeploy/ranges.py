"""Every command-line value's allowed range, in one place (issue 23).

Each option of every command gets one of these click types, so its range is checked while the
command line is parsed, before any work, and the range is metadata that tests read back
(tests/test_option_ranges.py walks `deploy`'s commands and tries values outside each range):

- `Int(min, max)`: an integer within [min, max]; `max` always fits the library that receives it
  (`INT32` for sizes, counts and lengths that become tensor dimensions or loop bounds, `SEED_MAX`
  for seeds: numpy takes 0..2**32-1). A 30-digit integer is refused, never handed to torch.
  `multiple_of` for sizes with a divisibility rule (SparseGPT blocks of 4 columns), `power_of_two` for
  block sizes (--quant-block), `one_of` for a fixed set (--bits 2/4/8).
- `Float(min, max, min_open, max_open)`: a finite number (NaN and +-inf refused) in the range.
- `Text(nonempty=True, pattern=)`: a string; the empty string is refused where it can mean nothing;
  `pattern` for names with a syntax (`DEVICE`, a Triton model name).
- `Choice(names)`: one of a fixed list (`unknown --flag 'x'`, the list in the fix).
- `Triple(lo, hi)`: `min:opt:max` integers (TensorRT profiles); `FloatList(Float)`: `--ratios`.
- `InPath(kind)` / `OutPath()`: a path the command reads (`file`, `dir`, `any`) or writes (a folder):
  not empty, no NUL, every name within NAME_MAX and the whole within PATH_MAX (so no OS call fails
  with ENAMETOOLONG); what exists there is checked where the path is used (models/checks.py,
  models/text.py, outdir.check_out / check_writable_folder), before any work.

A bad value is a `click.BadParameter`; cli._Group prints every usage error as one line
`error: ... Fix: ...` with exit code 2 (`one_line`).

Ranges that depend on the loaded model (sequence lengths vs its position table, ranks and
dictionary sizes vs its widths, block counts) cannot be click types: they are `ModelLimit`s
checked right after config.json is read and before any weight is loaded (config.check_model_limits,
each method's `validate(options, shape)`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import click

from .errors import UserError

INT32 = 2**31 - 1
SEED_MAX = 2**32 - 1


def _fmt(v: float | int) -> str:
    return f"{v:,}" if isinstance(v, int) and abs(v) >= 10_000 else f"{v:g}" if isinstance(v, float) else str(v)


def flag(param: click.Parameter | None) -> str:
    """The option's longest spelling (`--calib-len`), or the argument's name."""
    if param is None:
        return "the value"
    opts = [o for o in getattr(param, "opts", []) if o.startswith("--")]
    return max(opts, key=len) if opts else (param.name or "the value").upper()


class Int(click.IntRange):
    """An integer in [min, max] (max defaults to INT32), optionally a multiple of `multiple_of`."""

    name = "integer"

    def __init__(self, min: int | None = None, max: int | None = INT32, multiple_of: int | None = None,
                 power_of_two: bool = False, one_of: tuple[int, ...] | None = None) -> None:
        super().__init__(min=min, max=INT32 if max is None else max)
        self.multiple_of = multiple_of
        self.power_of_two = power_of_two
        self.one_of = tuple(one_of) if one_of else None

    def describe(self) -> str:
        if self.one_of:
            return "one of " + ", ".join(map(str, self.one_of))
        parts = ([] if self.min is None else [f">= {_fmt(self.min)}"]) + ([] if self.max is None else [f"<= {_fmt(self.max)}"])
        return ((", a power of two " if self.power_of_two else "") + " and ".join(parts)).lstrip(", ") \
            + (f", a multiple of {self.multiple_of}" if self.multiple_of else "")

    def ok(self, v: int) -> bool:
        return not ((self.min is not None and v < self.min) or (self.max is not None and v > self.max)
                    or (self.multiple_of and v % self.multiple_of) or (self.power_of_two and (v < 1 or v & (v - 1)))
                    or (self.one_of is not None and v not in self.one_of))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, bool) or value is None:
            return value
        try:
            v = value if isinstance(value, int) else int(str(value).strip(), 10)
        except ValueError:
            self.fail(f"{flag(param)} must be an integer {self.describe()}, got {value!r}", param, ctx)
        if not self.ok(v) and self.one_of:
            self.fail(f"{flag(param)} must be {self.describe()}, got {_fmt(v)}", param, ctx)
        if not self.ok(v):
            self.fail(f"{flag(param)} must be {self.describe()}, got {_fmt(v)}", param, ctx)
        return v

    def _describe_range(self) -> str:
        return self.describe()


class Float(click.FloatRange):
    """A finite float in the range (NaN and infinities refused, whatever click's comparisons do).
    `phrase` replaces the generated wording of the range (e.g. 'between 0 and 1 (exclusive)')."""

    name = "number"

    def __init__(self, min: float | None = None, max: float | None = None, min_open: bool = False,
                 max_open: bool = False, phrase: str | None = None) -> None:
        super().__init__(min=min, max=max, min_open=min_open, max_open=max_open)
        self.phrase = phrase

    def describe(self) -> str:
        if self.phrase:
            return self.phrase
        parts = (([] if self.min is None else [f"{'>' if self.min_open else '>='} {_fmt(float(self.min))}"])
                 + ([] if self.max is None else [f"{'<' if self.max_open else '<='} {_fmt(float(self.max))}"]))
        return "a finite number" + ("" if not parts else " " + " and ".join(parts))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None:
            return value
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            self.fail(f"{flag(param)} must be a number {self.describe()}, got {value!r}", param, ctx)
        if not self.ok(f):
            self.fail(f"{flag(param)} must be {self.describe()}, got {f:g}", param, ctx)
        return f

    def ok(self, f: float) -> bool:
        lo_bad = self.min is not None and (f < self.min or (self.min_open and f == self.min))
        hi_bad = self.max is not None and (f > self.max or (self.max_open and f == self.max))
        return math.isfinite(f) and not lo_bad and not hi_bad

    def _describe_range(self) -> str:
        return self.describe()


class Text(click.ParamType):
    """A string; `nonempty` refuses '' (and whitespace only); `pattern` (a regular expression the whole
    value must match, described by `what`) for names with a syntax (--device, a Triton model name)."""

    name = "text"

    def __init__(self, nonempty: bool = True, pattern: str | None = None, what: str = "", bad: str = "") -> None:
        self.nonempty = nonempty
        self.pattern, self.what = pattern, what
        self.bad = bad or "{flag} must be {what}, got {value!r}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if self.nonempty and isinstance(value, str) and not value.strip():
            self.fail(f"{flag(param)} may not be empty", param, ctx)
        if self.pattern and isinstance(value, str) and not re.fullmatch(self.pattern, value):
            self.fail(self.bad.format(flag=flag(param), what=self.what, value=value), param, ctx)
        return value


class Choice(click.Choice):
    """One of a fixed list of names (`unknown --flag 'x'` otherwise, the list in the fix)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value in self.choices:
            return value
        self.fail(f"unknown {flag(param)} {value!r}", param, ctx)


DEVICE = Text(pattern=r"cpu|cuda(:[0-9]{1,3})?", what="cpu, cuda or cuda:N", bad="unknown device {value!r} ({flag})")


class Triple(Text):
    """`min:opt:max` integers with lo <= min <= opt <= max <= hi (TensorRT profiles: --batch, --seq);
    the text is kept as given (engines/tensorrt.Range3 parses it)."""

    name = "min:opt:max"

    def __init__(self, lo: int = 1, hi: int = INT32) -> None:
        super().__init__(nonempty=True)
        self.lo, self.hi = lo, hi

    def describe(self) -> str:
        return f"min:opt:max integers with {self.lo} <= min <= opt <= max <= {_fmt(self.hi)}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        value = super().convert(value, param, ctx)
        if not isinstance(value, str):
            return value
        try:
            a, b, c = (int(x.strip(), 10) for x in value.split(":"))
        except ValueError:
            self.fail(f"{flag(param)} must be {self.describe()}, got {value!r}", param, ctx)
        if not self.lo <= a <= b <= c <= self.hi:
            self.fail(f"{flag(param)} must be {self.describe()}, got {value!r}", param, ctx)
        return value


class FloatList(Text):
    """A comma-separated list of numbers, each in `item`'s range (--ratios); the text is kept as given."""

    name = "numbers"

    def __init__(self, item: Float) -> None:
        super().__init__(nonempty=True)
        self.item = item

    def describe(self) -> str:
        return f"comma-separated numbers, each {self.item.describe()}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        value = super().convert(value, param, ctx)
        if not isinstance(value, str):
            return value
        parts = [x.strip() for x in value.split(",")]
        for x in parts:
            try:
                f = float(x)
            except ValueError:
                f = math.nan
            if not x or not math.isfinite(f) or not self.item.ok(f):
                self.fail(f"{flag(param)} must be {self.describe()}, got {value!r}", param, ctx)
        return value


NAME_MAX = 255    # bytes per path component (ext4, xfs, tmpfs, overlayfs)
PATH_MAX = 4096   # bytes per path (Linux)


class _PathText(Text):
    """A path: not empty, no NUL byte, every component within NAME_MAX and the whole within PATH_MAX (so
    no OS call made with it later fails with ENAMETOOLONG)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        value = super().convert(value, param, ctx)
        if not isinstance(value, str):
            return value
        if "\0" in value:
            self.fail(f"{flag(param)} contains a NUL byte", param, ctx)
        raw = os.fsencode(value)
        longest = max((len(c) for c in raw.split(b"/")), default=0)
        if longest > NAME_MAX or len(raw) > PATH_MAX:
            self.fail(f"{flag(param)} is too long for a path ({longest:,} bytes in one name, {len(raw):,} in all; "
                      f"at most {NAME_MAX} and {PATH_MAX})", param, ctx)
        return value


class InPath(_PathText):
    """A path the command reads: kind 'file', 'dir' or 'any' (checked where it is read)."""

    name = "path"

    def __init__(self, kind: str = "any") -> None:
        super().__init__(nonempty=True)
        self.kind = kind


class OutPath(_PathText):
    """A folder the command writes (checked by outdir.check_out / the command before any work)."""

    name = "folder"

    def __init__(self) -> None:
        super().__init__(nonempty=True)
        self.kind = "dir"


@dataclass(frozen=True)
class ModelLimit:
    """An upper bound of an option that depends on the model: `bound(shape)` (a models.shape.ModelShape,
    read from config.json alone) is the largest value the model takes, None where it sets no bound.
    Declared beside the option (MethodOption.limit, config.MODEL_LIMITS) and checked before any weight
    is loaded; the generated tests read it to try the first value past it."""

    what: str                                 # "positions", "the widest linear width", ...
    bound: Callable[[Any], int | None]

    def check(self, flag: str, value: Any, shape: Any, fix: str = "") -> None:
        hi = self.bound(shape)
        if value is None or hi is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value <= hi:
            return
        raise UserError(f"{flag} {_fmt(value)} exceeds {self.what} of {shape.name or 'the model'} ({_fmt(hi)})",
                        fix or f"pass {flag} <= {_fmt(hi)}")


POSITIONS = ModelLimit("the position table", lambda s: s.max_positions)
WIDEST = ModelLimit("the widest linear width", lambda s: max(s.widths))
NARROWEST = ModelLimit("the narrowest linear width", lambda s: min(s.widths))
BLOCKS = ModelLimit("the number of blocks", lambda s: s.layers)


def one_line(e: click.UsageError) -> str:
    """A click usage error (bad value, unknown option, missing argument) as `error: ... Fix: ...`."""
    raw = e.message if isinstance(e, click.BadParameter) else ""
    msg = " ".join((raw if raw and flag(getattr(e, "param", None)) in raw else e.format_message()).split())
    ctx = e.ctx
    cmd = ctx.command_path if ctx is not None else "deploy"
    param = getattr(e, "param", None)
    fix = f"see `{cmd} --help`"
    if param is not None and isinstance(param.type, (Int, Float, Triple, FloatList)):
        d = param.type.describe()
        fix = f"pass {d if d.startswith(('a ', 'one of', 'min:', 'comma')) else 'a value ' + d} ({fix})"
    elif param is not None and isinstance(param.type, Text) and param.type.pattern:
        fix = f"pass {param.type.what} ({fix})"
    elif param is not None and isinstance(param.type, click.Choice):
        fix = "use one of " + ", ".join(map(str, param.type.choices))
    return f"error: {msg.rstrip('.')}. Fix: {fix}"


class OneLineUsageError(click.UsageError):
    """What cli._Group raises in place of a click UsageError: shown as one line, exit code 2."""

    def __init__(self, original: click.UsageError) -> None:
        super().__init__(original.format_message(), original.ctx)
        self.line = one_line(original)
        self.exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(self.line, err=True)
