"""The project's error types: every error jointrd_timm raises on purpose derives from :class:`JointRDError`.

A :class:`JointRDError` says what was wrong with the input (a YAML, a model name, an output folder, a file) and what
to do about it; the ``jointrd`` command prints it as one line and exits with status 1. Any other exception is a bug
(or a failure of a library underneath) and keeps its traceback. Each subclass also keeps the built-in base it had
(``ValueError``, ``RuntimeError``, ...), so ``except ValueError`` written against earlier versions still catches it.
"""

__all__ = ['JointRDError', 'InputError', 'DivergedError']


class JointRDError(Exception):
    """Base of the errors jointrd_timm raises on purpose, with a message meant for the user."""


class InputError(JointRDError, ValueError):
    """A name or value given by the user that jointrd_timm does not accept (the message names what it accepts)."""


class DivergedError(JointRDError, FloatingPointError):
    """A training loss that is no longer finite: the run stops (its saved epochs are kept) and says what to change."""
