"""User-facing errors: a named problem plus a fix, shown as one line by the CLI (exit code 2)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment that the user can fix; never shown as a traceback."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.problem}. Fix: {self.fix}" if self.fix else self.problem


_DISK_ERRNOS = {"ENOSPC": "no space left on device", "EDQUOT": "disk quota exceeded"}


def disk_full(exc: BaseException) -> UserError | None:
    """A full disk or exhausted quota anywhere in `exc`'s chain, as a UserError (else None).

    Libraries wrap the OSError (ONNX Runtime, protobuf, safetensors), so the chain and the
    message are searched, not only the exception type.
    """
    import errno

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for name, text in _DISK_ERRNOS.items():
            code = getattr(errno, name, None)
            if (isinstance(e, OSError) and e.errno == code) or text in str(e).lower():
                where = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
                return UserError(f"{text}{where}; the build was stopped and its partial output removed",
                                 "free disk space, or pass an --out on a disk with room")
        e = e.__cause__ or e.__context__
    return None
