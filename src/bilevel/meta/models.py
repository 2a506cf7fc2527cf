"""Small functional models for meta-learning: parameters are plain dicts of tensors.

A :class:`MLPModel` has a *body* (feature extractor, ReLU after every layer) and a linear *head*::

    params = {"body": {"0.weight", "0.bias", "1.weight", ...}, "head": {"weight", "bias"}}
    out = head(params["head"], features(params["body"], inputs))

so the same parameters serve MAML (everything adapts), ANIL (only the head adapts), R2D2 and
ProtoNet (only the body is used; the head is replaced by a closed form / prototypes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["MLPModel", "linear_init", "features", "linear", "one_hot"]


def linear_init(
    fan_in: int, fan_out: int, generator: torch.Generator, dtype: torch.dtype, device=None
) -> dict[str, Tensor]:
    """U(−1/√fan_in, 1/√fan_in) weights and biases (the ``nn.Linear`` default)."""
    b = 1.0 / math.sqrt(fan_in)
    w = (torch.rand(fan_out, fan_in, generator=generator, dtype=torch.float64) * 2 - 1) * b
    c = (torch.rand(fan_out, generator=generator, dtype=torch.float64) * 2 - 1) * b
    return {"weight": w.to(dtype=dtype, device=device), "bias": c.to(dtype=dtype, device=device)}


def one_hot(labels: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """One-hot rows of integer labels, without the range check of ``F.one_hot`` (which reads the
    labels on the host and so cannot run under ``torch.func.vmap``; labels are checked up front
    by :meth:`bilevel.meta.MetaLearner.check`)."""
    return (labels[..., None] == torch.arange(classes, device=labels.device)).to(dtype)


def linear(p: dict[str, Tensor], h: Tensor) -> Tensor:
    return h @ p["weight"].T + p["bias"]


def features(body: dict[str, Tensor], h: Tensor) -> Tensor:
    """ReLU(W_L … ReLU(W_1 h + b_1) … + b_L): the body's layers in index order."""
    n = len(body) // 2
    for i in range(n):
        h = torch.relu(h @ body[f"{i}.weight"].T + body[f"{i}.bias"])
    return h


class MLPModel:
    """Body ``sizes[0] → … → sizes[-1]`` (ReLU after each layer) and a linear head to ``out``."""

    def __init__(self, sizes: Sequence[int], out: int):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 1 or any(s < 1 for s in sizes) or int(out) < 1:
            raise ValueError(f"MLPModel needs positive layer sizes and out, got {sizes} -> {out}")
        self.sizes, self.out = sizes, int(out)

    @property
    def feature_dim(self) -> int:
        return self.sizes[-1]

    def init(self, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
             device=None) -> dict[str, dict[str, Tensor]]:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        body = {}
        for i, (a, b) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            layer = linear_init(a, b, g, dtype, device)
            body[f"{i}.weight"], body[f"{i}.bias"] = layer["weight"], layer["bias"]
        return {"body": body, "head": linear_init(self.sizes[-1], self.out, g, dtype, device)}

    def __call__(self, params: dict, inputs: Tensor) -> Tensor:
        return linear(params["head"], features(params["body"], inputs))

    def __repr__(self) -> str:
        return f"MLPModel({'-'.join(map(str, self.sizes))}-{self.out})"
