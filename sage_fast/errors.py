"""The error every layer raises for a problem with what the user asked for.

It lives below both the command line and the library (``sage_fast.train``, ``sage_fast.assets``), so
neither has to import the other: the command line prints it as one paragraph and exits with code 2;
a library caller catches it (it is also a ``ValueError`` where that fits, see the subclasses)."""
from __future__ import annotations


class UsageError(Exception):
    """A problem with what the user asked for: printed as one paragraph, exit code 2."""


__all__ = ["UsageError"]
