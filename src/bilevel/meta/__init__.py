"""Meta-learning as multi-task bilevel optimization, with tasks batched by ``torch.func.vmap``.

Methods (one file each, citing the paper): :class:`MAML` / :class:`FOMAML` (Finn et al. 2017),
:class:`ANIL` (Raghu et al. 2020), :class:`IMAML` (Rajeswaran et al. 2019), :class:`R2D2`
(Bertinetto et al. 2019), :class:`MetaSGD` (Li et al. 2017), :class:`IAPTTFewShot` (IAPTT-GM's
few-shot variant, Liu et al. 2021), :class:`ProtoNet` (Snell et al. 2017,
the non-bilevel baseline). Task samplers: :class:`SinusoidTasks`, :class:`Episodes`.
Loaders (local files, checked): :func:`omniglot`, :func:`mini_imagenet`.
Training: :func:`meta_train` (and :class:`MetaTraining`, a solver for ``bl.solve``).
See docs/metalearning.md.
"""

from __future__ import annotations

from .anil import ANIL
from .base import MetaLearner, adapt, batched_mean_grad
from .iaptt import IAPTTFewShot
from .imaml import IMAML
from .maml import FOMAML, MAML
from .metasgd import MetaSGD
from .miniimagenet import mini_imagenet
from .models import MLPModel
from .omniglot import omniglot
from .protonet import ProtoNet
from .r2d2 import R2D2, ridge_head
from .tasks import Episodes, SinusoidTasks, check_tasks, class_split, stack_tasks
from .train import MetaTraining, evaluate_episodes, mean_ci95, meta_train

__all__ = ["MetaLearner", "MAML", "FOMAML", "ANIL", "IMAML", "IAPTTFewShot", "R2D2", "MetaSGD", "ProtoNet",
           "MLPModel", "SinusoidTasks", "Episodes", "class_split", "stack_tasks", "check_tasks",
           "adapt", "batched_mean_grad", "ridge_head", "omniglot", "mini_imagenet", "MetaTraining",
           "meta_train", "evaluate_episodes", "mean_ci95", "METHODS"]

METHODS = {"maml": MAML, "fomaml": FOMAML, "anil": ANIL, "imaml": IMAML, "r2d2": R2D2,
           "metasgd": MetaSGD, "protonet": ProtoNet, "iaptt": IAPTTFewShot}
