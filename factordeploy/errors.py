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
