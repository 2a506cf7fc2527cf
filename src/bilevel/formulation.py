"""The bilevel problem  min_x f(x, y*(x))  s.t.  y*(x) in argmin_y g(x, y).

:class:`Problem` holds the two user objectives. Internally, estimators work with
:class:`Objective` — the same function bound to a data batch and acting on *flat tuples* of
tensors — built by :class:`Bound` from the user's pytrees.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from . import _tree as T
from .errors import ConfigError, StructureMismatchError
from .validation import (
    check_batch,
    check_compatible,
    check_finite_groups,
    check_like,
    check_scalar,
    check_variables,
)

__all__ = ["Problem", "Objective", "Bound", "params", "batch_size", "start_fn"]


def start_fn(y: Any) -> Callable | None:
    """``y`` as a function x -> y0 (an initialization that depends on the upper variable), or None
    where ``y`` is a point (a tensor, module or pytree; checked first: dynamo cannot trace
    ``callable`` of a dict)."""
    if y is None or isinstance(y, (Tensor, nn.Module, dict, list, tuple)):
        return None
    return y if callable(y) else None


def _batch_arity(fn: Callable) -> str:
    """'none' (fn(x, y)), 'optional' (batch has a default) or 'required'."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins / C functions: assume flexible
        return "optional"
    pos = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()):
        return "optional"
    if len(pos) < 3:
        return "none"
    return "optional" if pos[2].default is not inspect.Parameter.empty else "required"


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: leading dimension of its first tensor (1 if no tensor)."""
    if batch is None:
        return 1
    first = batch[0] if type(batch) is tuple and batch else batch  # fast path: a tuple of tensors
    if isinstance(first, Tensor):
        return 1 if first.dim() == 0 else int(first.shape[0])
    leaves = [t for t in T.pytree.tree_leaves(batch) if isinstance(t, Tensor)]
    if not leaves or leaves[0].dim() == 0:
        return 1
    return int(leaves[0].shape[0])


def _takes_buffers(fn: Callable) -> bool:
    try:
        return "buffers" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class Problem:
    """A bilevel problem: ``upper`` is f(x, y[, batch]), ``lower`` is g(x, y[, batch]).

    Both must return a scalar tensor. ``x`` and ``y`` are pytrees of tensors (a Tensor, tuple,
    list or dict — e.g. ``bl.params(module)``).

    ``buffers``: state carried through the lower dynamics beside y — BatchNorm running
    statistics — as a :class:`bilevel.modules.Buffers` (e.g. ``net.running_stats()`` of a
    :class:`bilevel.Functional`): every inner step's train-mode forward pass at the iterate
    produces the next buffers (functionally, never written into the module), and the estimators
    return the final ones (``res.buffers``). They are state, not variables: nothing is
    differentiated through them. An upper objective with a ``buffers`` parameter,
    ``f(x, y, batch, *, buffers)``, is evaluated with the buffers at the end of the lower
    dynamics (e.g. in eval mode: ``net(y, X, buffers=buffers, train=False)``); the lower
    objective cannot take them (g is a function of (x, y, batch)).
    """

    def __init__(self, upper: Callable[..., Tensor], lower: Callable[..., Tensor], *, name: str = "",
                 buffers: Any = None):
        if not callable(upper) or not callable(lower):
            raise TypeError("Problem(upper=f, lower=g) needs two callables")
        self.upper = upper
        self.lower = lower
        self.name = name
        self._arity = {"upper": _batch_arity(upper), "lower": _batch_arity(lower)}
        if _takes_buffers(lower):
            raise ConfigError(
                "the lower objective takes a `buffers` parameter, but g must be a function of "
                "(x, y[, batch]): running statistics are state produced by its train-mode forward "
                "passes (Problem(buffers=...)), not an input; read them in the upper objective")
        from .modules import Buffers

        if buffers is not None and not isinstance(buffers, Buffers):
            raise ConfigError(
                "Problem(buffers=...) must be a bilevel.modules.Buffers (init + update), e.g. "
                f"bl.Functional(module).running_stats(); got {type(buffers).__name__}")
        self.buffers = buffers
        self._upper_buffers = _takes_buffers(upper)
        #: per level, the objective to call directly as fn(x, y, batch) given a batch (None: see _call)
        self._direct = {"upper": upper if self._arity["upper"] != "none" and not self._upper_buffers
                        else None, "lower": lower if self._arity["lower"] != "none" else None}
        if self._upper_buffers and buffers is None:
            raise ConfigError(
                "the upper objective takes `buffers`, but the problem carries none: pass "
                "Problem(f, g, buffers=net.running_stats()) (bl.Functional)")

    def __repr__(self) -> str:
        return f"Problem({self.name or getattr(self.upper, '__name__', 'f')})"

    def _call(self, level: str, x: Any, y: Any, batch: Any, buffers: Any = None) -> Tensor:
        fn = self.upper if level == "upper" else self.lower
        arity = self._arity[level]
        if batch is not None and arity != "none" and not (level == "upper" and self._upper_buffers):
            return check_scalar(fn(x, y, batch), level)  # the common case, without **kw
        kw = {"buffers": self.buffers.init if buffers is None else buffers} if (
            level == "upper" and self._upper_buffers) else {}
        if batch is None:
            if arity == "required":
                raise TypeError(
                    f"the {level}-level objective needs a batch argument but no data was given "
                    f"(pass {level}_batch=... / {level}_data=...)"
                )
            out = fn(x, y, **kw)
        else:
            if arity == "none":
                raise TypeError(
                    f"data was given for the {level} level but its objective takes only (x, y); "
                    "add a third `batch` parameter"
                )
            out = fn(x, y, batch, **kw)
        return check_scalar(out, level)

    def f(self, x: Any, y: Any, batch: Any = None, *, buffers: Any = None) -> Tensor:
        """Upper objective value (validated scalar); ``buffers`` for an f that reads them
        (default: the problem's initial buffers)."""
        return self._call("upper", x, y, batch, buffers)

    def g(self, x: Any, y: Any, batch: Any = None) -> Tensor:
        """Lower objective value (validated scalar)."""
        return self._call("lower", x, y, batch)


_LEAF_SPECS: dict[int, tuple[Any, bool]] = {}  # id(spec) -> (spec, is a bare tensor)


def _is_leaf(spec: T.Spec) -> bool:
    """Does ``spec`` describe a bare tensor? (Memoized: an objective is built per batch, on the
    same few specs.)"""
    if spec is None:
        return False
    if torch.compiler.is_compiling():  # (a graph reading the memo would be guarded on its
        return T.is_leaf_spec(spec)    # entries, and recompile once it is cleared)
    hit = _LEAF_SPECS.get(id(spec))
    if hit is None or hit[0] is not spec:
        if len(_LEAF_SPECS) > 256:
            _LEAF_SPECS.clear()
        hit = _LEAF_SPECS[id(spec)] = (spec, T.is_leaf_spec(spec))
    return hit[1]


class Objective:
    """One level's objective bound to a batch, as a function of flat leaves ``(xs, ys)``.

    ``level`` and ``n`` (samples in the batch) let the oracle layer count sample-gradient calls.
    """

    __slots__ = ("problem", "level", "batch", "xspec", "yspec", "n", "_xleaf", "_yleaf", "buffers",
                 "_direct")

    def __init__(self, problem: Problem, level: str, batch: Any, xspec: T.Spec, yspec: T.Spec,
                 buffers: Any = None):
        self.problem, self.level, self.batch = problem, level, batch
        self.buffers = buffers  # carried state read by an upper objective (see Problem)
        self.xspec, self.yspec = xspec, yspec
        self.n = batch_size(batch)
        check_batch(batch, self.n, level)
        # fast path: a bare tensor variable needs no pytree rebuild (saves ~10 us per call)
        self._xleaf, self._yleaf = _is_leaf(xspec), _is_leaf(yspec)
        # the common case of Problem._call (one-leaf variables, a batch the objective takes, no
        # buffers), resolved once: the objective itself, called directly
        self._direct = (problem._direct[level] if batch is not None and buffers is None
                        and self._xleaf and self._yleaf else None)

    def __call__(self, xs: T.Leaves, ys: T.Leaves) -> Tensor:
        direct = self._direct
        if direct is not None:
            return check_scalar(direct(xs[0], ys[0], self.batch), self.level)
        x = xs[0] if self._xleaf else T.unflatten(xs, self.xspec)
        y = ys[0] if self._yleaf else T.unflatten(ys, self.yspec)
        return self.problem._call(self.level, x, y, self.batch, self.buffers)

    def with_batch(self, batch: Any) -> Objective:
        return Objective(self.problem, self.level, batch, self.xspec, self.yspec, self.buffers)

    def with_buffers(self, buffers: Any) -> Objective:
        """The same objective reading ``buffers`` (an upper objective that takes them)."""
        return Objective(self.problem, self.level, self.batch, self.xspec, self.yspec, buffers)


class Bound:
    """A problem with its variables flattened: what every estimator and solver works on.

    ``y`` may be a pytree (starting point) or a callable ``x -> y0`` (an initialization that is
    itself a function of the upper variable, e.g. MAML); :meth:`init` evaluates it on flat leaves
    so derivatives through it flow to ``x``.
    """

    def __init__(
        self,
        problem: Problem,
        x: Any,
        y: Any,
        *,
        upper_batch: Any = None,
        lower_batch: Any = None,
        buffers: Any = None,
    ):
        if not isinstance(problem, Problem):
            raise TypeError(f"expected a bilevel.Problem, got {type(problem).__name__}")
        self.problem = problem
        xs, self.xspec = T.flatten(x)
        check_variables(xs, "x")
        self.xs = T.detach(xs)
        self.y_fn = start_fn(y)
        y0 = self.y_fn(x) if self.y_fn is not None else y
        ys, self.yspec = T.flatten(y0)
        check_variables(ys, "y")
        check_compatible(self.xs, ys)
        check_finite_groups([("upper", "the upper variable x", self.xs),
                             ("lower", "the lower start y0", ys)])
        self.ys0 = T.detach(ys)
        self._set_buffers(buffers)
        self.F = Objective(problem, "upper", upper_batch, self.xspec, self.yspec, self.buffers0)
        self.G = Objective(problem, "lower", lower_batch, self.xspec, self.yspec)

    def _set_buffers(self, buffers: Any) -> None:
        spec = self.problem.buffers
        if buffers is not None and spec is None:
            raise ConfigError("buffers were given, but the problem carries none "
                              "(bl.Problem(f, g, buffers=...))")
        self.buffers0 = None if spec is None else spec.check(
            spec.init if buffers is None else buffers, "buffers")

    @property
    def carries(self) -> bool:
        """Does the problem carry buffers through the lower dynamics?"""
        return self.problem.buffers is not None

    def carry(self, xs: T.Leaves) -> Any:
        """``(k, point, buffers) -> buffers``: one train-mode step of the problem's buffers at
        the lower iterate ``point`` (flat leaves) on the lower batch, without a graph (for
        :func:`bilevel.inner.unroll`); ``None`` when the problem carries no buffers."""
        spec = self.problem.buffers
        if spec is None:
            return None
        x = self.x_tree(T.detach(xs))
        batch = self.G.batch

        def step(k: int, point: T.Leaves, buffers: Any) -> Any:
            with torch.no_grad():
                new = spec.update(x, self.y_tree(T.detach(point)), buffers, batch)
            return spec.check(new, f"the buffers after inner step {k + 1}")

        return step

    def upper_with(self, info: dict[str, Any]) -> Objective:
        """The upper objective reading the buffers at the end of the lower dynamics
        (``info["buffers"]``, as :func:`bilevel.inner.unroll` returns them), else :attr:`F`."""
        b = info.get("buffers")
        return self.F if b is None else self.F.with_buffers(b)

    @classmethod
    def from_leaves(
        cls,
        problem: Problem,
        xs: T.Leaves,
        xspec: T.Spec,
        ys: T.Leaves,
        yspec: T.Spec,
        *,
        upper_batch: Any = None,
        lower_batch: Any = None,
        y_fn: Any = None,
        buffers: Any = None,
    ) -> Bound:
        """Fast constructor for solvers that already hold validated flat leaves."""
        b = cls.__new__(cls)
        b.problem, b.xs, b.xspec, b.ys0, b.yspec, b.y_fn = problem, xs, xspec, ys, yspec, y_fn
        b._set_buffers(buffers)
        b.F = Objective(problem, "upper", upper_batch, xspec, yspec, b.buffers0)
        b.G = Objective(problem, "lower", lower_batch, xspec, yspec)
        return b

    def init(self, xs: T.Leaves) -> T.Leaves:
        """Starting lower point as a (differentiable) function of flat ``xs``."""
        if self.y_fn is None:
            return self.ys0
        ys, spec = T.flatten(self.y_fn(T.unflatten(xs, self.xspec)))
        check_like(ys, spec, self.ys0, self.yspec, "y0(x)")
        return ys

    def x_tree(self, xs: T.Leaves) -> Any:
        return T.unflatten(xs, self.xspec)

    def y_tree(self, ys: T.Leaves) -> Any:
        return T.unflatten(ys, self.yspec)

    def check_grad_x(self, gs: T.Leaves) -> None:
        check_like(gs, self.xspec, self.xs, self.xspec, "hypergradient")


def params(module: nn.Module, *, frozen: str = "error", name: str = "module") -> dict[str, Tensor]:
    """A module's trainable parameters as ``{name: tensor}`` (detached copies) for
    ``functional_call`` / :class:`bilevel.Functional`: a variable of the bilevel problem.

    Parameters with ``requires_grad=False`` raise a :class:`~bilevel.ConfigError` naming them and
    ``name`` unless ``frozen="constant"`` (then they are left out and stay fixed)."""
    if not isinstance(module, nn.Module):
        raise StructureMismatchError(f"params() expects an nn.Module, got {type(module).__name__}")
    from .modules import module_params

    return module_params(module, frozen=frozen, name=name)
