"""Errors a user can act on: each message is one paragraph saying what was wrong and what to do.

``train.py`` prints such an error as that paragraph on stderr and exits 1; the traceback goes to the run's log
file (``train.log``), or to the terminal with ``HYDRA_FULL_ERROR=1``. Any other exception is a bug and keeps its
traceback.
"""
from __future__ import annotations

__all__ = ["UserError", "is_user_error"]


class UserError(Exception):
    """Base of the errors whose message is the whole story (subclassed together with a builtin, e.g.
    ``class ResumeRefused(UserError, ValueError)``, so that callers catching the builtin still do)."""


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, UserError)
