"""The --out folder: never lose a user's files, never leave half a build, never interleave two builds.

The rules (README, "Bad input"):
- An existing non-empty folder is replaced only when `deploy` wrote it (MARKER inside) or the
  user passed --overwrite; a folder holding any input of the build (the model, calibration
  text, a checkpoint, the current folder) is never replaced.
- A build writes into a temporary sibling `.NAME.tmp-PID` and replaces --out only after it
  succeeded, atomically: renameat2(RENAME_EXCHANGE) swaps the two folders in one step where
  the kernel and file system allow it, else the old folder is renamed aside, the new one
  moved in, and the old one deleted last. Until the swap the old folder is untouched.
- `.NAME.lock` (an flock) serialises builds to one --out: a second build fails fast with the
  first one's pid (waiting would hide that two commands fight over one folder). The kernel
  drops an flock when its process dies, so a lock file left by a killed build is stale: the
  next build takes it over and deletes the killed build's temporary folders.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError, disk_full
from .progress import log

MARKER = ".factordeploy-build.json"
_BLOCKED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _abs(path: str | Path) -> Path:
    """Absolute path without resolving a final symlink (so a symlinked --out can be refused)."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def tmp_prefix(out: Path) -> str:
    """Name prefix of the temporary siblings of `out` (tests look for leftovers with it)."""
    return f".{out.name}.tmp-"


def _contains(folder: Path, path: Path) -> bool:
    return path == folder or folder in path.parents


def check_out(out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an --out that a build must not write (one named problem + fix each), before any work."""
    out_abs = _abs(out)
    if out_abs.is_symlink():
        raise UserError(f"--out {out} is a symbolic link", "pass the real folder it points to, or a new folder")
    if out_abs.exists() and not out_abs.is_dir():
        raise UserError(f"--out {out} exists and is not a folder", "choose a folder path for --out")
    real = out_abs.resolve()
    if real == Path(real.anchor) or real == Path.home().resolve():
        raise UserError(f"--out {out} is the file-system root or your home folder", "choose a new folder for --out")
    for p in [Path.cwd(), *inputs]:
        p_real = _abs(p).resolve()
        if _contains(real, p_real):
            what = "the current folder" if p == Path.cwd() else f"the input {p}"
            raise UserError(f"--out {out} contains {what}; replacing --out would delete it",
                            "choose an --out folder outside your inputs and the current folder")
    probe = real.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--out {out} is not writable: {probe} is a file", "choose a folder you can write to")
    if not os.access(probe, os.W_OK | os.X_OK) or (real.exists() and not os.access(real, os.W_OK)):
        raise UserError(f"--out {out} is not writable", "choose a folder you can write to")
    if real.is_dir() and not overwrite and not (real / MARKER).is_file():
        entries = sorted(p.name for p in real.iterdir())
        if entries:
            raise UserError(f"--out {out} already holds {len(entries)} file(s) that deploy did not write "
                            f"(e.g. {entries[0]})",
                            "choose a new or empty folder, or pass --overwrite to replace it")


def check_writable_folder(folder: str | Path, flag: str) -> None:
    """Before any work: `flag`'s folder exists as a folder or can be created, on a file system that takes
    new files (not /proc, /sys, a read-only mount). Probed by creating and at once removing an empty
    folder in the nearest existing ancestor, so nothing is left behind."""
    import tempfile

    p = _abs(folder)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder", f"pass a folder for {flag}")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag} {folder} cannot be created: {probe} is a file", f"pass a folder you can write to for {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".factordeploy-probe-", dir=probe))
    except OSError as e:
        raise UserError(f"{flag} {folder} cannot be written: {probe} does not take new files ({e.strerror or e})",
                        f"pass a folder on an ordinary writable disk for {flag}") from None


class OutLock:
    """An exclusive flock on `.NAME.lock` beside --out; fails fast if another live build holds it."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.parent / f".{out.name}.lock"
        self.fd: int | None = None
        self.stale = False

    def acquire(self) -> "OutLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown pid"
                os.close(fd)
                raise UserError(f"--out {self.out} is being written by another deploy build ({holder})",
                                "wait for that build to finish, or choose another --out") from None
            # The previous holder unlinks the file while still holding it; if we locked an
            # unlinked inode, start over on the current file.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.fd = fd
            break
        try:
            self.stale = os.fstat(fd).st_size > 0  # a holder that died without releasing left its pid here
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, started {time.strftime('%H:%M:%S')}".encode(), 0)
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # unlink before unlocking: a waiter re-checks the inode (see acquire)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def _leftovers(out: Path) -> list[Path]:
    """Temporary siblings of `out` from builds that were killed (only safe to touch under the lock)."""
    prefixes = (tmp_prefix(out), f".{out.name}.old-")
    return [p for p in out.parent.iterdir() if p.name.startswith(prefixes)]


def _recover(out: Path) -> None:
    """Undo what a killed build left: restore an old folder moved aside mid-swap, delete temp folders."""
    left = _leftovers(out)
    old = [p for p in left if p.name.startswith(f".{out.name}.old-")]
    if old and not out.exists():
        os.rename(old[0], out)
        log(f"restored {out} that an interrupted build had moved aside")
    for p in left:
        if p.exists():
            _remove(p)
            log(f"removed {p.name} left by an interrupted build")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP for the few syscalls of a swap, so it is never cut in half."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _swap_in(tmp: Path, out: Path, aside: Path) -> None:
    """Move the finished `tmp` onto `out`. The old folder ends up at `tmp` (exchanged) or `aside`."""
    with _signals_deferred():
        if not out.exists():
            os.rename(tmp, out)
        elif not _exchange(tmp, out):
            os.rename(out, aside)
            os.rename(tmp, out)


def write_marker(folder: Path, command: str) -> None:
    from . import __version__

    (folder / MARKER).write_text(json.dumps({"written_by": "factordeploy", "version": __version__,
                                             "command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


def _make_parents(folder: Path, created: list[Path] | None = None) -> list[Path]:
    """mkdir -p that records the folders it created (deepest first) in `created`, so a failure (even in
    the middle of this call) can remove them."""
    created = [] if created is None else created
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    for m in reversed(missing):
        m.mkdir()
        created.insert(0, m)
    return created


def os_error(e: OSError, what: str, path: Path | str, fix: str = "", out: Path | str | None = None) -> UserError:
    """An operating-system error of the --out machinery as one line naming the path and the fix
    (a full disk keeps errors.disk_full's wording)."""
    full = disk_full(e)
    if full is not None:
        return full
    reason = e.strerror or type(e).__name__
    if not fix:
        fix = {errno.EACCES: "choose an --out in a folder you can write to",
               errno.EPERM: "choose an --out in a folder you can write to",
               errno.EROFS: "choose an --out on a writable file system",
               errno.ENOENT: "choose an --out on an ordinary disk (this location cannot hold new files)",
               }.get(e.errno, "choose an --out on an ordinary writable disk")
    where = f"--out {out}: " if out is not None else ""
    return UserError(f"{where}cannot {what} {path}: {reason}", fix)


@contextmanager
def _os_step(what: str, path: Path | str, out: Path | str | None = None) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise os_error(e, what, path, out=out) from None


@contextmanager
def out_transaction(out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = (),
                    command: str = "build") -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes `out` (marker written), on any failure
    or signal it is deleted and `out` is exactly as before.

    Usage: `with out_transaction(cfg.out, cfg.overwrite) as tmp: ...write into tmp...`
    """
    inputs = list(inputs)
    check_out(out, overwrite, inputs)
    out_abs = _abs(out)
    created: list[Path] = []
    try:
        _make_parents(out_abs.parent, created)
    except OSError as e:
        _remove_created(created)
        raise os_error(e, "create its parent folder", out_abs.parent, out=out) from None
    lock = OutLock(out_abs)
    ok = False
    try:
        with _os_step("create the lock file", lock.path, out):
            lock.acquire()
        if lock.stale:
            log(f"taking over the stale lock of a build that died ({lock.path.name})")
        with _os_step("clean up what an interrupted build left beside it in", out_abs.parent, out):
            _recover(out_abs)
        check_out(out, overwrite, inputs)  # again under the lock: the folder may have changed meanwhile
        tmp = out_abs.parent / f"{tmp_prefix(out_abs)}{os.getpid()}"
        aside = out_abs.with_name(f".{out_abs.name}.old-{os.getpid()}")
        try:
            with _os_step("create the temporary folder", tmp, out):
                tmp.mkdir()
            yield tmp
            with _os_step("write the build marker into", tmp, out):
                write_marker(tmp, command)
            with _os_step("move the finished build onto", out_abs, out):
                _swap_in(tmp, out_abs, aside)
            ok = True
        finally:
            for p in (tmp, aside):  # the failed build, or the replaced old folder
                try:
                    if p.exists():
                        _remove(p)
                except OSError as e:  # never hide the build's own error behind a clean-up error
                    log(f"could not remove {p}: {e.strerror or e}; delete it by hand")
    finally:
        try:
            lock.release()
        except OSError as e:
            log(f"could not remove the lock file {lock.path}: {e.strerror or e}; delete it by hand")
        if not ok:  # leave no trace: folders made for --out go too (the lock file is gone now)
            _remove_created(created)


def _remove_created(created: list[Path]) -> None:
    for d in created:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Write a file or folder at a temporary sibling; it replaces `path` only if the block succeeds.

    For caches and checkpoints: a crash, signal or full disk never leaves a half-written `path`
    nor the temporary sibling.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        with _signals_deferred():
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)
