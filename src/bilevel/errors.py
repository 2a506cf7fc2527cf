"""Exception and warning types. Every user-facing error raised by the package derives from
``BilevelError``, every warning from ``BilevelWarning``."""

from __future__ import annotations


class BilevelError(Exception):
    """Base class of all errors raised by ``bilevel``."""


class NonScalarObjectiveError(BilevelError, ValueError):
    """An objective returned something other than a real scalar tensor."""


class StructureMismatchError(BilevelError, ValueError):
    """Pytree structure, shape, dtype or device of two related variables disagree."""


class NonFiniteError(BilevelError, FloatingPointError):
    """NaN or inf appeared. ``level`` is ``"upper"``/``"lower"``; ``step`` the iteration (or None)."""

    def __init__(self, message: str, *, level: str | None = None, step: int | None = None):
        super().__init__(message)
        self.level = level
        self.step = step


class LinearSolveError(BilevelError, ArithmeticError):
    """A linear solve broke down and the caller asked for strict behaviour."""


class ConfigError(BilevelError, ValueError):
    """Invalid configuration (unknown key, bad value)."""


class EmptyDataError(BilevelError, ValueError):
    """A data batch (or data set) has no samples: every mean over it would be NaN or zero."""


class BilevelWarning(UserWarning):
    """Base class of all warnings issued by ``bilevel``."""


class LinearSolveWarning(BilevelWarning, RuntimeWarning):
    """A linear solve broke down (negative or zero curvature, divergence, overflow) and a
    safeguard was used instead of its result; issued once per estimator run."""


class InexactResumeWarning(BilevelWarning):
    """A run was resumed with a data loader whose batch order is not reproducible (it shuffles
    with the global RNG): the resumed run continues at the right position, but with other
    batches than the uninterrupted run would have drawn. Issued once per resumed run."""


class StartIndependenceWarning(BilevelWarning):
    """An implicit estimator was given a start y0(x) that depends on x: the implicit
    hypergradient ignores that dependence (y* is a function of x alone)."""
