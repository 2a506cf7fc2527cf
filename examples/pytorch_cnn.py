"""Weight-decay tuning of a small CNN with BatchNorm on the bundled MNIST sample, the PyTorch way.

    min_λ  CE_val(y*(λ))      y*(λ) = argmin_y  CE_train(y) + ½ e^λ ‖y‖²

* the lower variable y is the CNN's parameters (``bl.Functional(module).params()``), the upper
  variable a named hyperparameter tensor ``{"log_wd": λ}``;
* batches come from ordinary ``DataLoader``s;
* ``bl.argmin`` returns y*(λ) as a tensor whose backward applies the implicit function theorem,
  so the outer loop is a plain ``torch.optim.Adam`` loop with ``loss.backward()``;
* BatchNorm runs in train mode inside the objectives (batch statistics, nothing written); its
  running statistics are carried as state (``net.update_buffers``) and used for the eval-mode
  test accuracy, after ``bl.load_into`` wrote the result back into the module.

Run ``python examples/pytorch_cnn.py`` (about a minute on a laptop CPU) or with ``--tiny`` (a few
seconds; what the test suite runs).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bilevel as bl
from bilevel.datasets import mnist5k

TINY = "--tiny" in sys.argv
N_TRAIN, N_VAL, N_TEST, OUTER, INNER = (256, 128, 256, 4, 10) if TINY else (2000, 1000, 1000, 30, 20)

torch.manual_seed(0)
data = mnist5k()
perm = np.random.default_rng(0).permutation(len(data))
images = torch.tensor(data.images[perm], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
images = F.avg_pool2d(images, 2)  # 14x14: keeps the example fast
labels = torch.tensor(data.labels[perm])
splits = np.cumsum([0, N_TRAIN, N_VAL, N_TEST])
train, val, test = (TensorDataset(images[a:b], labels[a:b]) for a, b in zip(splits[:-1], splits[1:]))
train_loader = DataLoader(train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(1))
val_loader = DataLoader(val, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(2))

module = nn.Sequential(
    nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
    nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
    nn.Flatten(), nn.Linear(16 * 2 * 2, 10),
)
net = bl.Functional(module, name="CNN")


def lower(x, y, batch):  # g: training loss + weight decay e^λ/2 ‖y‖²  (BatchNorm in train mode)
    images, labels = batch
    decay = sum((p**2).sum() for p in y.values())
    return F.cross_entropy(net(y, images), labels) + 0.5 * x["log_wd"].exp() * decay


def upper(y, batch):  # f: validation loss
    images, labels = batch
    return F.cross_entropy(net(y, images), labels)


hyper = {"log_wd": torch.tensor(-4.0, requires_grad=True)}
opt = torch.optim.Adam(hyper.values(), lr=0.3)
# the lower level is non-convex and solved approximately: damped CG solves (H + λI) v = ∇_y f
# (the proximal system of iMAML, Rajeswaran et al. 2019), well posed even where H is indefinite
diff = bl.hypergrad.CG(None, iters=10, damping=0.5)
inner = bl.inner.Momentum(lr=0.1, momentum=0.9, steps=INNER)
y, buffers = net.params(), net.buffers()

train_batches, val_batches = iter(train_loader), iter(val_loader)


def draw(it, loader):
    try:
        return next(it), it
    except StopIteration:  # new epoch
        it = iter(loader)
        return next(it), it


for step in range(OUTER):
    tb, train_batches = draw(train_batches, train_loader)
    vb, val_batches = draw(val_batches, val_loader)
    # y*(λ) on this training batch, warm-started at the previous solution
    y = bl.argmin(lower, hyper, {k: v.detach() for k, v in y.items()}, solver=inner, diff=diff,
                  batch=tb)
    loss = upper(y, vb)
    opt.zero_grad()
    loss.backward()
    if step == 0:  # the autograd function gives exactly the implicit estimator's hypergradient
        ref = bl.hypergrad.CG(None, iters=10, damping=0.5)(
            bl.Problem(upper=lambda x, y_, b: upper(y_, b), lower=lower),
            {"log_wd": hyper["log_wd"].detach()}, {k: v.detach() for k, v in y.items()},
            lower_batch=tb, upper_batch=vb)
        rel = abs(float(hyper["log_wd"].grad - ref.grad["log_wd"])) / abs(float(ref.grad["log_wd"]))
        print(f"argmin backward vs bl.hypergrad.CG: relative difference {rel:.1e}")
    opt.step()
    buffers = net.update_buffers({k: v.detach() for k, v in y.items()}, buffers, tb[0])
    print(f"step {step + 1}: validation loss {loss.item():.4f}  weight decay "
          f"{hyper['log_wd'].detach().exp().item():.2e}")

bl.load_into(module, {k: v.detach() for k, v in y.items()}, buffers=buffers)
module.eval()
with torch.no_grad():
    acc = float((module(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean())
    same = torch.allclose(module(test.tensors[0]),
                          net(net.params(), test.tensors[0], buffers=buffers, train=False))
print(f"test accuracy {acc:.3f} (eval mode, running statistics from update_buffers)")
print(f"module after load_into reproduces the functional eval-mode output: {same}")
