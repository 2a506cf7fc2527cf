"""Benchmark problems. Stochastic (finite-sum) problems return a
:class:`~bilevel.problems._stochastic.StochasticProblem` (problem, x0, y0, samplers, evaluation)."""

from ._stochastic import StochasticProblem, make_sampler
from .hyperclean import hyperclean
from .quadratic import stochastic_quadratic
from .regsel import load_ijcnn1, regularization_selection, synthetic_ijcnn1

__all__ = [
    "StochasticProblem",
    "make_sampler",
    "stochastic_quadratic",
    "regularization_selection",
    "load_ijcnn1",
    "synthetic_ijcnn1",
    "hyperclean",
]

# deterministic toys with known solutions (issue 4)
from .toys import TOYS, Box, Toy, llc_toy, nonconvex_toy, quadratic_toy  # noqa: E402

__all__ += ["Toy", "Box", "TOYS", "nonconvex_toy", "llc_toy", "quadratic_toy"]

# survey formulations (issue 13): docs/survey.md
from .stackelberg import stackelberg_duopoly, stackelberg_equilibrium  # noqa: E402

__all__ += ["stackelberg_duopoly", "stackelberg_equilibrium"]
from .reformulations import penalty_solution, smoothed_vf_constraint, smoothed_vf_solution  # noqa: E402

__all__ += ["penalty_solution", "smoothed_vf_solution", "smoothed_vf_constraint"]
from .darts import DartsToy, darts_toy  # noqa: E402

__all__ += ["DartsToy", "darts_toy"]


# --- lr-poison: learning-rate learning (13.1), data poisoning (13.3) ---
from .lr_learning import LRLearning, lr_learning  # noqa: E402

__all__ += ["LRLearning", "lr_learning"]
from .poisoning import Poisoning, poisoning  # noqa: E402

__all__ += ["Poisoning", "poisoning"]


# --- distill: data distillation + KIP (13.2) ---
from .distillation import (  # noqa: E402
    Distillation,
    KernelDistillation,
    RandomInitDescent,
    distillation,
    kernel_distillation,
)

__all__ += ["Distillation", "KernelDistillation", "RandomInitDescent", "distillation", "kernel_distillation"]


# --- labels: label learning, Meta-Weight-Net (13.4), surrogate loss (13.9) ---
from .labels import LabelData, LabelProblem, label_data, label_learning, meta_weight_net  # noqa: E402

__all__ += ["LabelData", "LabelProblem", "label_data", "label_learning", "meta_weight_net"]
from .surrogate import F1Data, SurrogateProblem, f1_data, surrogate_loss  # noqa: E402

__all__ += ["F1Data", "SurrogateProblem", "f1_data", "surrogate_loss"]


# --- sparse-implicit: dictionary learning (13.7), implicit layers (13.8) ---
from .dictionary import DictionaryToy, atom_match, dictionary_learning, normalize_columns  # noqa: E402

__all__ += ["DictionaryToy", "dictionary_learning", "atom_match", "normalize_columns"]
from .implicit_layers import DEQToy, Equilibrium, NeuralODEToy, deq_regression, map_step, neural_ode  # noqa: E402

__all__ += ["DEQToy", "Equilibrium", "deq_regression", "map_step", "NeuralODEToy", "neural_ode"]


# --- proxy: best-response proxies (13.10) ---
from .proxy import ProxyRidge, proxy_ridge  # noqa: E402

__all__ += ["ProxyRidge", "proxy_ridge"]
