"""Three-level optimization by nesting ``bl.argmin`` (checked against the closed form).

    min_x  f(x, y*(x))
    y*(x)    = argmin_y  g(x, y, z*(x, y))
    z*(x, y) = argmin_z  h(x, y, z)

The middle objective calls ``bl.argmin`` for the innermost level; the outer ``bl.argmin``
differentiates through it (its backward needs second derivatives of g ∘ z*, which the inner
argmin provides through a differentiable backward). With quadratics every level has a closed
form, so the hypergradient can be checked exactly (see tests/pytorch/test_layers.py): the
first outer step prints the relative error of the three-level hypergradient against the closed
form, the last line the distance to the closed-form optimum.

    python examples/multilevel.py              # 15 outer steps (~20 s of CPU)
    python examples/multilevel.py --outer 1    # one outer step: the hypergradient check (tests)
"""

from __future__ import annotations

import argparse

import torch

import bilevel as bl

torch.set_default_dtype(torch.float64)
gen = torch.Generator().manual_seed(0)
dx, dy, dz = 2, 3, 4


def spd(n):
    Q = torch.randn(n, n, generator=gen)
    return Q @ Q.T / n + torch.eye(n)


A, P = spd(dz), spd(dy)
B, C, D, E = (torch.randn(*s, generator=gen) for s in ((dz, dx), (dz, dy), (dy, dx), (dz, dy)))
c = torch.randn(dy, generator=gen)


def h(xy, z):  # innermost: z*(x, y) = A⁻¹(Bx + Cy)
    x, y = xy
    return 0.5 * z @ A @ z - z @ (B @ x + C @ y)


# closed forms: z* = Mx x + My y, y* = N x, and the minimizer of ½‖Nx − c‖² + 0.05‖x‖²
Mx, My = torch.linalg.solve(A, B), torch.linalg.solve(A, C)
K = My - E
N = torch.linalg.solve(P + K.T @ K, D - K.T @ Mx)
x_star = torch.linalg.solve(N.T @ N + 0.1 * torch.eye(dx), N.T @ c)
# step sizes 1/L from the levels' Hessians (known here; in practice a tuned or adaptive rule)
ev_y = torch.linalg.eigvalsh(P + K.T @ K)
lr_y, steps_y = 1 / ev_y[-1].item(), int(25 * ev_y[-1] / ev_y[0])
lr_x = 1 / torch.linalg.eigvalsh(N.T @ N + 0.1 * torch.eye(dx))[-1].item()


def g(x, y):  # middle: its value depends on the innermost solution
    # forward solve of the innermost level: any solver — here its closed form (cheap); the
    # backward is the implicit function theorem by CG, as for every argmin
    z = bl.argmin(h, (x, y), torch.zeros(dz),
                  solver=lambda xy, z0: torch.linalg.solve(A, B @ xy[0] + C @ xy[1]))
    return 0.5 * y @ P @ y - y @ D @ x + 0.5 * ((z - E @ y) ** 2).sum()


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--outer", type=int, default=15, help="outer SGD steps (default 15)")
outer = parser.parse_args().outer

x = torch.zeros(dx, requires_grad=True)
opt = torch.optim.SGD([x], lr=lr_x, momentum=0.5)
y = torch.zeros(dy)
for t in range(outer):
    y = bl.argmin(g, x, y.detach(), solver=bl.inner.GD(lr=lr_y, steps=steps_y))  # warm start
    loss = 0.5 * ((y - c) ** 2).sum() + 0.05 * (x**2).sum()
    opt.zero_grad()
    loss.backward()
    if t == 0:  # closed form of the hypergradient: d/dx ½‖Nx − c‖² + 0.05‖x‖²
        ref = N.T @ (N @ x.detach() - c) + 0.1 * x.detach()
        err = ((x.grad - ref).norm() / ref.norm()).item()
        print(f"outer step 1: hypergradient relative error vs the closed form {err:.1e}")
    opt.step()
print(f"middle-level GD steps per outer step: {steps_y}")
print(f"three-level loss {loss.item():.6f}; distance to the closed-form optimum "
      f"{(x.detach() - x_star).norm().item():.2e} (from {x_star.norm().item():.2e})")
