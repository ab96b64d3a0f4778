"""Progress and stage logging to stderr, so long work is visible and stdout stays parseable."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def log(msg: str) -> None:
    if not _QUIET:
        print(f"[factordeploy] {msg}", file=sys.stderr, flush=True)


def track(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Yield items while printing a compact progress line (tqdm when installed)."""
    if _QUIET:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        yield from items
        return
    yield from tqdm(items, desc=f"[factordeploy] {desc}", total=total, file=sys.stderr, leave=False,
                    mininterval=1.0)


@contextmanager
def stage(name: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Time a named stage; record seconds in `timings`."""
    log(f"{name} ...")
    t0 = time.perf_counter()
    yield
    dt = time.perf_counter() - t0
    if timings is not None:
        timings[name] = round(dt, 3)
    log(f"{name} done in {dt:.1f}s")


def is_quiet() -> bool:
    return _QUIET
