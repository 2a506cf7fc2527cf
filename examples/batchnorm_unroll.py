"""BatchNorm running statistics carried through the inner dynamics (docs/pytorch.md, section 1).

A small CNN with BatchNorm; the lower level trains it (cross-entropy + tuned weight decay e^x),
the upper level is the validation loss in **eval mode** with the running statistics the lower
steps produced. The statistics are carried functionally: every inner step's train-mode forward
pass at the iterate gives the next ones, the module is never written. The script checks that
after K steps they equal K ordinary ``module.train(); module(images)`` passes of a copy at the
same iterates, and that the module is untouched.

    python examples/batchnorm_unroll.py
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl

torch.manual_seed(0)
module = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                       nn.Linear(4 * 6 * 6, 3)).double()
gen = torch.Generator().manual_seed(1)


def images_and_labels(n):
    return (torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=gen))


train, val = images_and_labels(32), images_and_labels(16)
net = bl.Functional(module)
before = {k: b.clone() for k, b in module.state_dict().items()}


def lower(x, y, batch):  # train mode: batch statistics (g does not read the running ones)
    images, labels = batch
    return F.cross_entropy(net(y, images), labels) + 0.5 * x.exp() * sum((p**2).sum() for p in y.values())


def upper(x, y, batch, *, buffers):  # eval mode with the statistics carried through the unroll
    images, labels = batch
    return F.cross_entropy(net(y, images, buffers=buffers, train=False), labels)


problem = bl.Problem(upper, lower, buffers=net.running_stats())  # inputs: batch[0]
K = 10
dyn = bl.inner.Momentum(lr=0.1, momentum=0.5, steps=K)
x = torch.tensor(-3.0, dtype=torch.float64)
res = bl.hypergrad.Reverse(dyn)(problem, x, net.params(), lower_batch=train, upper_batch=val)
fwd = bl.hypergrad.Forward(dyn)(problem, x, net.params(), lower_batch=train, upper_batch=val)
print(f"eval-mode hypergradient: Reverse {res.grad.item():.6e}, Forward {fwd.grad.item():.6e}")

# the same K steps of ordinary training, by side effect on a copy of the module
ref = copy.deepcopy(module).train()
bound = bl.formulation.Bound(problem, x, net.params(), lower_batch=train)
for k in range(K):  # the iterate y_k of the dynamics, then one train-mode forward pass at it
    yk, _ = bl.hypergrad.base.solve_lower(bound, dyn, bound.xs, bound.ys0, steps=k)
    bl.load_into(ref, bound.y_tree(yk))
    with torch.no_grad():
        ref(train[0])
diff = max((res.buffers[k] - b).abs().max().item() for k, b in ref.named_buffers())
print(f"carried statistics vs {K} manual train-mode forwards: max abs difference {diff:.1e}; "
      f"num_batches_tracked {int(res.buffers['1.num_batches_tracked'])}")
print("module untouched:", all(torch.equal(module.state_dict()[k], b) for k, b in before.items()))
