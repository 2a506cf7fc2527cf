"""Bilevel problems on ``nn.Module``s: parameters as variables, buffers as state, seeded dropout.

The variables of a bilevel problem are pytrees of tensors; for a module they are its parameters
as a ``{name: tensor}`` dict (:func:`bilevel.params`), and the objectives evaluate the module
*functionally* with those tensors (``torch.func.functional_call``), never through the module's
own (mutable) parameters. :class:`Functional` does this and handles what ``functional_call``
alone gets wrong inside bilevel algorithms:

* **Buffers are state, not variables.** In train mode a BatchNorm layer normalizes with the
  statistics of the current batch, so the objective does not depend on the running statistics:
  they are an *output* of training, not an input of g. ``net(params, x)`` in train mode therefore
  writes nothing (no running-stat update, no ``num_batches_tracked`` increment): the objective is
  a pure function of (params, batch), which is what HVPs, ``torch.func.jvp``/``vmap``
  (``Forward``) and dense Hessians (``Exact``) need — the in-place buffer update is what made
  those fail. Running statistics are carried explicitly: ``buffers = net.update_buffers(params,
  buffers, x)`` returns the statistics after one train-mode step on ``x`` (PyTorch's own update,
  same momentum and counter, applied to copies), and ``net(params, x, buffers=buffers,
  train=False)`` evaluates in eval mode with them.
* **Dropout is seeded.** Each train-mode call draws its dropout masks from ``seed`` (default the
  one given at construction) on a forked RNG: the same call gives the same masks, so g is one
  deterministic function during an unroll or a linear solve, and the global RNG is untouched.
* **Frozen parameters** (``requires_grad=False``) cannot be lower variables silently: they are an
  error unless ``frozen="constant"``, which keeps them fixed at the module's values.
* **Running statistics inside the unroll.** ``bl.Problem(f, g, buffers=net.running_stats())``
  carries the buffers as state through the lower dynamics (:class:`Buffers`): at each inner step
  the train-mode forward pass at the iterate y_k on the lower batch gives the next statistics —
  exactly what K steps of ordinary training would have left in the module, without touching it —
  and an upper objective ``f(x, y, batch, *, buffers)`` can evaluate in eval mode with them.
* :func:`load_into` writes results (``res.y``, updated buffers) back into the module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, StructureMismatchError

__all__ = ["Functional", "Buffers", "load_into", "module_params"]


def _trainable(module: nn.Module, name: str, frozen: str) -> dict[str, Tensor]:
    if frozen not in ("error", "constant"):
        raise ConfigError(f"frozen must be 'error' or 'constant', got {frozen!r}")
    names = [k for k, p in module.named_parameters() if not p.requires_grad]
    if names and frozen == "error":
        raise ConfigError(
            f"{name}: parameters {names} have requires_grad=False; frozen parameters cannot be "
            "variables of the bilevel problem — unfreeze them, or pass frozen='constant' to keep "
            "them fixed at the module's values"
        )
    return {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}


def module_params(module: nn.Module, *, frozen: str = "error", name: str = "module"
                  ) -> dict[str, Tensor]:
    """A module's trainable parameters as ``{name: tensor}`` (detached copies): a variable of the
    bilevel problem. Frozen parameters raise (naming them and ``name``) unless
    ``frozen="constant"``, which leaves them out (they stay fixed inside :class:`Functional`)."""
    if not isinstance(module, nn.Module):
        raise StructureMismatchError(f"{name}: expected an nn.Module, got {type(module).__name__}")
    return _trainable(module, name, frozen)


@contextlib.contextmanager
def _mode(module: nn.Module, train: bool) -> Iterator[None]:
    """Temporarily set train/eval mode on every submodule; restore each one's flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in flags:
            m.training = train
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class Buffers:
    """State carried through the lower dynamics beside y (``bl.Problem(f, g, buffers=...)``).

    Args:
        init: the buffers before the first inner step (a dict ``{name: tensor}`` or any pytree
            of tensors), e.g. ``net.buffers()``.
        update: ``(x, y, buffers, batch) -> buffers``: the buffers after one train-mode step at
            the lower iterate y on the lower batch (called without a graph, never
            differentiated; it must not modify its arguments in place).
        name: how errors refer to these buffers.

    With s_0 = ``init``, the lower dynamics y_{k+1} = Φ_k(x, y_k) carry s_{k+1} = update(x, y_k,
    s_k, batch) (y_k: the point where step k evaluates ∇_y g — Nesterov's extrapolated point); the
    estimators return s_K as ``res.buffers`` and evaluate an upper objective with a ``buffers``
    parameter at s_K. The hypergradient treats s_K as a constant (running statistics are not
    differentiated, as in PyTorch training). A structure or shape change is an error naming
    the step.
    """

    def __init__(self, init: Any, update: Callable[[Any, Any, Any, Any], Any], *,
                 name: str = "buffers"):
        if not callable(update):
            raise ConfigError(f"{name}: update must be a callable (x, y, buffers, batch) -> buffers")
        self.name, self.update = name, update
        self._leaves, self._spec = torch.utils._pytree.tree_flatten(init)
        if not all(isinstance(t, Tensor) for t in self._leaves):
            raise StructureMismatchError(f"{name}: init must be a pytree of tensors")
        self.init = torch.utils._pytree.tree_map(lambda t: t.detach().clone(), init)

    def check(self, buffers: Any, what: str) -> Any:
        """``buffers`` if it has the structure and leaf shapes of ``init`` (else an error)."""
        leaves, spec = torch.utils._pytree.tree_flatten(buffers)
        if spec != self._spec:
            raise StructureMismatchError(f"{self.name}: {what} do not have the structure of the "
                                         f"initial buffers ({spec} vs {self._spec})")
        for i, (a, b) in enumerate(zip(leaves, self._leaves)):
            if not isinstance(a, Tensor) or a.shape != b.shape:
                got = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
                raise StructureMismatchError(f"{self.name}: {what}: leaf {i} is {got}, the initial "
                                             f"buffer has shape {tuple(b.shape)}; buffers cannot "
                                             "change shape")
        return buffers

    def __repr__(self) -> str:
        return f"Buffers({self.name}, {len(self._leaves)} tensors)"


def _first_input(batch: Any) -> tuple[Any, ...]:
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],)
    if isinstance(batch, Tensor):
        return (batch,)
    raise ConfigError(
        "running_stats(): cannot tell the module's input from the lower batch "
        f"({type(batch).__name__}); pass inputs=lambda batch: (images,) (and for a lower objective "
        "without a batch, the tensors it closes over)")


class Functional:
    """``net = Functional(module)``: the module as a pure function ``net(params, *inputs)``.

    Args:
        module: the ``nn.Module``; its parameters and buffers are read (at construction for
            frozen parameters and buffer shapes, on :meth:`params` / :meth:`buffers`), never
            written (use :func:`load_into`).
        seed: seed of the dropout masks of train-mode calls without an explicit ``seed=``.
        frozen: ``"error"`` (default) rejects parameters with ``requires_grad=False``;
            ``"constant"`` keeps them fixed at the module's values, outside the variables.
        name: how errors refer to this module (e.g. ``"lower module"``).

    Calling ``net(params, *inputs, buffers=None, train=True, seed=None)`` returns the module's
    output with ``params`` (a dict as from :meth:`params`; autograd / ``torch.func`` flow through
    it) and:

    * ``train=True``: batch statistics for normalization layers, active dropout drawn from
      ``seed`` (``None``: the constructor's; ``False``: the global RNG, not reproducible), no
      buffer written; ``buffers`` (if given) are used by layers that read buffers in train mode;
    * ``train=False``: eval mode with ``buffers`` (default: the module's current buffers).
    """

    def __init__(self, module: nn.Module, *, seed: int = 0, frozen: str = "error",
                 name: str = "module"):
        if not isinstance(module, nn.Module):
            raise StructureMismatchError(f"{name}: expected an nn.Module, got {type(module).__name__}")
        self.module, self.seed, self.name = module, int(seed), name
        _trainable(module, name, frozen)  # validates `frozen` and the parameters
        self.frozen = frozen
        self._constants = {k: p.detach() for k, p in module.named_parameters() if not p.requires_grad}
        self._param_shapes = {k: p.shape for k, p in module.named_parameters() if p.requires_grad}
        self._buffer_shapes = {k: b.shape for k, b in module.named_buffers()}

    def __repr__(self) -> str:
        return f"Functional({type(self.module).__name__}, seed={self.seed}, frozen={self.frozen!r})"

    # -- variables and state ---------------------------------------------------------------
    def params(self) -> dict[str, Tensor]:
        """The module's trainable parameters (detached copies), e.g. the lower variable y0."""
        return _trainable(self.module, self.name, self.frozen)

    def buffers(self) -> dict[str, Tensor]:
        """Copies of the module's buffers (running statistics): state carried beside y."""
        return {k: b.detach().clone() for k, b in self.module.named_buffers()}

    def _check_params(self, params: Any) -> None:
        if not isinstance(params, dict):
            raise StructureMismatchError(
                f"{self.name}: params must be a dict {{name: tensor}} as from .params(), got "
                f"{type(params).__name__}")
        missing = sorted(set(self._param_shapes) - set(params))
        extra = sorted(set(params) - set(self._param_shapes))
        if missing or extra:
            raise StructureMismatchError(
                f"{self.name}: params do not match the module's trainable parameters "
                f"(missing {missing}, unexpected {extra})")

    def _check_buffers(self, buffers: dict[str, Tensor], what: str) -> None:
        for k, b in buffers.items():
            if k not in self._buffer_shapes:
                raise StructureMismatchError(f"{self.name}: {what}[{k!r}] is not a buffer of the module "
                                             f"(buffers: {sorted(self._buffer_shapes)})")
            if b.shape != self._buffer_shapes[k]:
                raise StructureMismatchError(
                    f"{self.name}: {what}[{k!r}] has shape {tuple(b.shape)}, the module's buffer "
                    f"has shape {tuple(self._buffer_shapes[k])}; buffers cannot change shape")

    @contextlib.contextmanager
    def _rng(self, seed: int | bool | None, device: torch.device) -> Iterator[None]:
        if seed is False:
            yield
            return
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed if seed is None or seed is True else int(seed))
            yield

    # -- evaluation --------------------------------------------------------------------------
    def __call__(self, params: dict[str, Tensor], *inputs: Any, buffers: dict[str, Tensor] | None = None,
                 train: bool = True, seed: int | bool | None = None) -> Any:
        self._check_params(params)
        if buffers is None:
            buffers = {k: b.detach() for k, b in self.module.named_buffers()}
        else:
            self._check_buffers(buffers, "buffers")
        if train:  # train mode never writes: normalization layers get no running statistics
            buffers = {k: (None if _is_running_stat(self.module, k) else b)
                       for k, b in buffers.items()}
        tensors = {**self._constants, **params, **buffers}
        device = next(iter(params.values())).device if params else torch.device("cpu")
        with _mode(self.module, train), self._rng(seed if train else False, device):
            return torch.func.functional_call(self.module, tensors, inputs)

    def running_stats(self, inputs: Callable[[Any], Any] | None = None,
                      params: Callable[[Any], dict[str, Tensor]] | None = None,
                      init: dict[str, Tensor] | None = None,
                      seed: int | bool | None = None) -> Buffers:
        """The module's buffers as state carried through the lower dynamics:
        ``bl.Problem(f, g, buffers=net.running_stats())``.

        Each inner step applies :meth:`update_buffers` at the iterate on the lower batch.
        ``inputs(batch)``: the module's input(s) in a lower batch (default: ``batch[0]`` of a
        tuple/list batch, or the batch itself if it is a tensor); ``params(y)``: this module's
        parameters in the lower variable (default: y itself, as from :meth:`params`); ``init``:
        the starting buffers (default: the module's current ones, copied); ``seed``: the
        dropout seed of those forward passes (default: the constructor's, as in g).
        """
        get_inputs = _first_input if inputs is None else inputs
        get_params = (lambda y: y) if params is None else params

        def update(x: Any, y: Any, buffers: Any, batch: Any) -> dict[str, Tensor]:
            xs = get_inputs(batch)
            xs = xs if isinstance(xs, tuple) else (xs,)
            return self.update_buffers(get_params(y), buffers, *xs, seed=seed)

        return Buffers(self.buffers() if init is None else init, update,
                       name=f"{self.name} running statistics")

    def update_buffers(self, params: dict[str, Tensor], buffers: dict[str, Tensor], *inputs: Any,
                       seed: int | bool | None = None) -> dict[str, Tensor]:
        """The buffers after one train-mode forward pass on ``inputs`` at ``params``: PyTorch's own
        running-statistics update (momentum, ``num_batches_tracked``), applied to copies, without a
        graph. The module and the given ``buffers`` are unchanged; a buffer that changes shape is
        an error naming it."""
        self._check_params(params)
        self._check_buffers(buffers, "buffers")
        new = {k: b.detach().clone() for k, b in buffers.items()}
        tensors = {**self._constants, **{k: p.detach() for k, p in params.items()}, **new}
        device = next(iter(params.values())).device if params else torch.device("cpu")
        seen: dict[str, Tensor] = {}

        def capture(mod: nn.Module, args: Any, out: Any) -> None:  # buffers as the forward left them
            seen.update((k, b) for k, b in mod.named_buffers() if k in new)

        handle = self.module.register_forward_hook(capture)
        try:
            with torch.no_grad(), _mode(self.module, True), self._rng(seed, device):
                torch.func.functional_call(self.module, tensors, inputs)
        finally:
            handle.remove()
        new.update(seen)  # in-place updates (BatchNorm) and reassigned buffers alike
        self._check_buffers(new, "update_buffers()")
        return new


def _is_running_stat(module: nn.Module, name: str) -> bool:
    """True for the running statistics of a normalization layer (what train mode would write)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return isinstance(owner, nn.modules.batchnorm._NormBase) and leaf in (
        "running_mean", "running_var", "num_batches_tracked")


def load_into(module: nn.Module, params: dict[str, Tensor] | None = None,
              buffers: dict[str, Tensor] | None = None) -> nn.Module:
    """Copy ``params`` (e.g. ``res.y``) and ``buffers`` into ``module``'s own tensors, in place.

    Keys are parameter / buffer names; a missing or unknown key, or a shape mismatch, is a
    :class:`~bilevel.StructureMismatchError` naming it. Returns the module.
    """
    own_p, own_b = dict(module.named_parameters()), dict(module.named_buffers())
    for what, given, own in (("params", params, own_p), ("buffers", buffers, own_b)):
        if given is None:
            continue
        if not isinstance(given, dict):
            raise StructureMismatchError(f"load_into: {what} must be a dict {{name: tensor}}, got "
                                         f"{type(given).__name__}")
        unknown = sorted(set(given) - set(own))
        if unknown:
            raise StructureMismatchError(f"load_into: {what} {unknown} are not in the module")
        for k, v in given.items():
            if v.shape != own[k].shape:
                raise StructureMismatchError(
                    f"load_into: {what}[{k!r}] has shape {tuple(v.shape)}, the module's has "
                    f"{tuple(own[k].shape)}")
    with torch.no_grad():
        for given, own in ((params, own_p), (buffers, own_b)):
            for k, v in (given or {}).items():
                own[k].copy_(v)
    return module
