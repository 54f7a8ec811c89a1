"""The `kdl` command line: parse arguments, make one call, print. Nothing else.

app.py holds the command group and the shared options; each other module holds one group of
commands, added to the app when it is imported here. torch and pydantic are imported inside the
commands that need them, so `kdl --help`, `kdl runs` and `kdl show` start fast. Errors a user can
fix print one paragraph and exit 2.
"""

from __future__ import annotations

from .app import app

# each module adds its commands to the app, in this order in `kdl --help`
# isort: off
from . import train, evaluate, sweep, runs  # noqa: E402, F401
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    app()
