"""The one error type that reaches the user as a single line and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a message that names the problem and the fix.

    The CLI prints ``error: <message>`` and exits with :attr:`exit_code`, without a
    traceback. Raise it anywhere input is checked; never for bugs.
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)
