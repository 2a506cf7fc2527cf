"""Many tasks at once: per-task hypergradients with ``bl.hypergrad.vmap`` (equal to a loop over tasks),
then a shared regularization meta-learned on their mean with a torch.optim optimizer."""

import torch

import bilevel as bl

torch.set_default_dtype(torch.float64)
B, n, d = 8, 30, 5  # tasks, samples per task, features
gen = torch.Generator().manual_seed(0)
w_true = torch.randn(B, d, generator=gen) * torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0])  # 2 useful features


def make(m):
    X = torch.randn(B, m, d, generator=gen)
    return X, (X @ w_true.unsqueeze(-1)).squeeze(-1) + 0.5 * torch.randn(B, m, generator=gen)


train, val = make(n), make(n)


def lower(x, w, batch):  # ridge with one log-regularization per feature, shared by all tasks
    X, t = batch
    return 0.5 * ((X @ w - t) ** 2).mean() + 0.5 * (torch.exp(x) * w * w).sum()


def upper(x, w, batch):  # validation loss of the task
    X, t = batch
    return 0.5 * ((X @ w - t) ** 2).mean()


problem = bl.Problem(upper, lower)
est = bl.hypergrad.CG(bl.inner.GD(lr=0.1, steps=50), iters=20, warm_start=True)
x, w = torch.zeros(d), torch.zeros(B, d)
res = bl.hypergrad.vmap(est, problem, x, w, lower_batch=train, upper_batch=val)
loop = torch.stack([est(problem, x, w[i], lower_batch=(train[0][i], train[1][i]),
                        upper_batch=(val[0][i], val[1][i])).grad for i in range(B)])
print(f"per-task hypergradients {tuple(res.grad.shape)}, max |vmap - loop| = "
      f"{float((res.grad - loop).abs().max()):.1e}")


def val_loss(res):
    return float(0.5 * ((val[0] @ res.y.unsqueeze(-1)).squeeze(-1) - val[1]).pow(2).mean())


before = val_loss(res)
x = x.clone().requires_grad_(True)
opt = torch.optim.Adam([x], lr=0.2)
for _ in range(40):  # meta-gradient = mean of the per-task hypergradients; warm starts per task
    res = bl.hypergrad.vmap(est, problem, x.detach(), res.y, state=res.state, lower_batch=train,
                            upper_batch=val)
    x.grad = res.grad.mean(0)
    opt.step()
    with torch.no_grad():  # keep exp(x) <= e^2 so that GD(lr=0.1) stays stable
        x.clamp_(-4.0, 2.0)
res = bl.hypergrad.vmap(est, problem, x.detach(), res.y, state=res.state, lower_batch=train,
                        upper_batch=val)
print(f"mean validation loss {before:.4f} -> {val_loss(res):.4f}")
print("learned regularization exp(x):", [round(v, 2) for v in torch.exp(x.detach()).tolist()])
