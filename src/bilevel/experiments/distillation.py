"""``bilevel run distillation`` / ``distillation-run``: dataset distillation on the bundled MNIST sample.

``distillation-run`` learns ``ipc`` synthetic images per class by one of two methods
(:mod:`bilevel.problems.distillation`):

* ``unrolled`` — Wang et al. 2018, Alg. 1: images and learning rate as x, T GD steps of a small
  classifier from a fresh random initialization at every outer step, reverse mode through them
  (:class:`~bilevel.hypergrad.Reverse` in :class:`~bilevel.problems.distillation.RandomInitDescent`);
  evaluated by training ``eval.inits`` fresh models (seeds never used in training) on the images;
* ``kip`` — Nguyen et al. 2021: kernel ridge regression on the images as the lower level, in closed
  form (:class:`~bilevel.hypergrad.ClosedForm`); evaluated by the KRR predictor's test accuracy.

Baselines (the same count of images, same labels layout): ``eval.draws`` random draws of real
training images per class, and per-class k-means centroids (the class means for ipc = 1). For
``unrolled`` each baseline is trained by the same T steps and by ``eval.long_steps`` steps, each with
the rate of a grid that is best on the *training* split; for ``kip`` with the ridge λ of a grid best
on the training split; plus KRR on the whole training split as a reference. ``distillation`` runs
the grid ``ipc × methods``, tabulates the test accuracies and draws the distilled images.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..inner import Adam
from ..problems.distillation import MODELS, class_centroids, distillation, kernel_distillation, random_real
from ..sampling import Minibatches
from ..solvers import HypergradientDescent
from . import checkpoint as CK
from .base import Experiment, Setup, SubResult, SubRun, Table, markdown_table, register, run_device, run_dtype
from .runner import CHECKPOINTS

__all__ = ["DistillationRun", "Distillation", "image_grid"]

METHODS = ("unrolled", "kip")
LR_GRID = (1e-2, 3e-2, 0.1, 0.3, 1.0)
#: seed of the evaluation initializations (never drawn in training)
EVAL_SEED = 10**6
REG_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
#: Wang et al. 2018, Table 1 (LeNet on full MNIST, 10 images): the reader's anchor, not a target
WANG_FIXED, WANG_RANDOM = "93.8%", "79.5 ± 8.1%"
UNROLLED_KEYS = {"model.kind", "model.hidden", "inner.steps", "inner.lr0", "inner.inits", "inner.per_step_lr",
                 "eval.inits", "eval.long_steps"}
KIP_KEYS = {"kip.gamma", "kip.reg0"}


@register
class DistillationRun(Experiment):
    name = "distillation-run"
    description = "dataset distillation on MNIST: unrolled GD from random inits (Wang 2018) or KRR (KIP)"
    reference = "Wang, Zhu, Torralba & Efros 2018, Alg. 1; Nguyen, Chen & Lee 2021 (KIP), Eq. 2-3"
    defaults = {
        "seed": 0, "steps": 300, "eval_every": 50, "checkpoint_every": 0,
        "method": "unrolled",
        "ipc": 1,                                     # synthetic images per class
        "data": {"n_train": 4000, "n_test": 1000, "downsample": 1, "batch": 500},
        "model": {"kind": "linear", "hidden": 0},     # unrolled: the classifier trained on the images
        "inner": {"steps": 10, "lr0": 0.1, "inits": 4, "per_step_lr": False},
        "upper": {"lr": 0.02},                        # Adam on (images, log lr | log λ)
        "kip": {"gamma": 1.0, "reg0": 0.01},          # RBF exp(-γ‖a−b‖²/d), initial ridge λ
        "eval": {"inits": 10, "draws": 5, "long_steps": 100},
    }
    choices = {"method": METHODS, "model.kind": MODELS}

    def build(self, cfg: dict[str, Any]) -> Setup:
        d, ipc, seed = cfg["data"], int(cfg["ipc"]), int(cfg["seed"])
        # KIP solves an ill-conditioned K_ss + λI once λ is learned small: float64 by default
        dtype = run_dtype(cfg, torch.float64 if cfg["method"] == "kip" else torch.float32)
        kw = {"n_train": d["n_train"], "n_test": d["n_test"], "downsample": d["downsample"], "seed": seed,
              "dtype": dtype, "device": run_device(cfg)}
        ev = cfg["eval"]
        if ev["draws"] < 1 or ev["inits"] < 1:
            raise ConfigError(f"eval.draws and eval.inits must be ≥ 1, got {ev['draws']}, {ev['inits']}")
        upper = Adam(lr=cfg["upper"]["lr"])
        if cfg["method"] == "unrolled":
            inn = cfg["inner"]
            pb = distillation(ipc, model=cfg["model"]["kind"], hidden=cfg["model"]["hidden"],
                              steps=inn["steps"], n_inits=inn["inits"], lr0=inn["lr0"],
                              per_step_lr=inn["per_step_lr"], **kw)
            solver = pb.solver(upper)
            x0, y0 = pb.start()
            n_eval = int(ev["inits"])

            def evaluate(x: dict[str, torch.Tensor], y: Any) -> dict[str, float]:
                acc = pb.evaluate(x["images"], x["log_lr"].exp(), n_inits=n_eval, seed=EVAL_SEED)
                lr = x["log_lr"].exp()
                return {"test_acc": float(acc.mean()),
                        "test_acc_std": float(acc.std()) if n_eval > 1 else 0.0, "lr": float(lr.mean())}

            baselines = lambda: _unrolled_baselines(pb, ipc, int(ev["draws"]), n_eval,  # noqa: E731
                                                    int(ev["long_steps"]), seed)
            unused, progress = KIP_KEYS, ("test_acc", "lr")
            info = {"method": "unrolled", "model": cfg["model"]["kind"], "inner_steps": inn["steps"],
                    "solver": f"RandomInitDescent(Reverse(GD(lr=exp(log_lr), steps={inn['steps']})), "
                              f"{inn['inits']} fresh inits per step), Adam({cfg['upper']['lr']:g})"}
        else:
            kd = kernel_distillation(ipc, gamma=cfg["kip"]["gamma"], reg0=cfg["kip"]["reg0"], **kw)
            pb = kd
            solver = HypergradientDescent(kd.estimator(), upper=upper, warm_start=False)
            x0, y0 = kd.start()

            def evaluate(x: dict[str, torch.Tensor], y: Any) -> dict[str, float]:
                # ‖∇_α g(x, α*(x))‖: the closed form solves the lower level at every x (the runner's
                # lower_grad_norm pairs the α of the previous step with the updated x)
                with torch.enable_grad():
                    a = kd.solve(x).requires_grad_()
                    (ga,) = torch.autograd.grad(kd.problem.g(x, a), a)
                return {"test_acc": kd.accuracy(x["images"], x["log_reg"]), "reg": float(x["log_reg"].exp()),
                        "closed_form_residual": float(ga.norm())}

            baselines = lambda: _kip_baselines(kd, ipc, int(ev["draws"]), seed)  # noqa: E731
            unused, progress = UNROLLED_KEYS, ("test_acc", "reg")
            info = {"method": "kip", "gamma": cfg["kip"]["gamma"],
                    "solver": f"HypergradientDescent(ClosedForm(KRR solve), Adam({cfg['upper']['lr']:g}))"}
        upper_data = Minibatches(*pb.data["train"], batch_size=int(d["batch"]), seed=seed)
        info.update(ipc=ipc, n_images=ipc * 10)
        return Setup(problem=pb.problem, x0=x0, y0=y0, solver=solver, evaluate=evaluate, baselines=baselines,
                     upper_data=upper_data, progress=progress, unused=unused, info=info,
                     plot_metrics=("test_acc", "upper_loss", *progress[1:]),
                     plot_refs={"test_acc": {"random real": "random_acc", "class means": "means_acc"}})

    def summarize(self, cfg: dict[str, Any], final: dict[str, Any], extras: dict[str, Any],
                  info: dict[str, Any]) -> str:
        ipc = int(cfg["ipc"])
        rows = [["distilled (" + cfg["method"] + ")", f"{100 * final['test_acc']:.1f}"
                 + (f" ± {100 * final['test_acc_std']:.1f}" if "test_acc_std" in final else "")]]
        for k, label in (("random", "random real"), ("means", "class means / k-means")):
            rows.append([label, f"{100 * extras[k + '_acc']:.1f} ± {100 * extras[k + '_std']:.1f}"
                         + f" ({extras[k + '_setting']})"])
            if f"{k}_long_acc" in extras:
                rows.append([label + f", {cfg['eval']['long_steps']} steps",
                             f"{100 * extras[k + '_long_acc']:.1f} ± {100 * extras[k + '_long_std']:.1f}"
                             + f" ({extras[k + '_long_setting']})"])
        if "full_acc" in extras:
            rows.append([f"KRR on all {cfg['data']['n_train']} training images",
                         f"{100 * extras['full_acc']:.1f}"])
        head = (f"## Dataset distillation, {ipc} image(s) per class ({10 * ipc} images), "
                f"method {cfg['method']}\n\n")
        note = ""
        if "closed_form_residual" in final:
            res = final["closed_form_residual"]
            note = (f"\nα*(x) from the closed form: ‖∇_α g(x, α*(x))‖ = {res:.1e} at "
                    "the final x (the runner's check below pairs the last step's α with the updated x).\n")
        return head + markdown_table(["support set", "test accuracy [%]"], rows) + (
            f"\nWang et al. 2018 (LeNet, full MNIST, 10 images): {WANG_FIXED} fixed init, "
            f"{WANG_RANDOM} random init.\n") + note


def _accs(values: list[torch.Tensor]) -> tuple[float, float]:
    a = torch.cat([v.flatten() for v in values]).to(torch.float64)
    return float(a.mean()), float(a.std()) if a.numel() > 1 else 0.0


def _unrolled_baselines(pb: Any, ipc: int, draws: int, n_inits: int, long_steps: int,
                        seed: int) -> dict[str, Any]:
    """Random real images and class centroids trained by T and ``long_steps`` GD steps from the
    evaluation inits, each with the grid rate best on the training split (one training per
    (set, rate, steps) gives both the training and the test accuracy)."""
    Xtr, ttr = pb.data["train"]
    C = pb.model.n_classes
    g = torch.Generator().manual_seed(seed + 1)
    supports = {"random": [random_real(Xtr, ttr, ipc, C, g) for _ in range(draws)],
                "means": [class_centroids(Xtr, ttr, ipc, C, seed=seed)]}
    inits = pb.init(0, n_inits, EVAL_SEED)
    out: dict[str, Any] = {}
    for name, sets in supports.items():
        for tag, steps in (("", pb.steps), ("_long", long_steps)):
            scores = {}
            for lr in LR_GRID:
                ys = [pb.train(S, lr, inits, steps) for S in sets]
                scores[lr] = [_accs([pb.model.accuracy(y, *pb.data[split]) for y in ys])
                              for split in ("train", "test")]
            best = max(LR_GRID, key=lambda lr: scores[lr][0][0])
            m, s = scores[best][1]
            out.update({f"{name}{tag}_acc": m, f"{name}{tag}_std": s,
                        f"{name}{tag}_setting": f"{steps} steps, lr {best:g}"})
    return out


def _kip_baselines(kd: Any, ipc: int, draws: int, seed: int) -> dict[str, Any]:
    """KRR with random real images / class centroids as support (λ of the grid best on the training
    split), and KRR on the whole training split (λ = the initial reg0)."""
    Xtr, ttr = kd.data["train"]
    C = kd.n_classes
    g = torch.Generator().manual_seed(seed + 1)
    supports = {"random": [random_real(Xtr, ttr, ipc, C, g) for _ in range(draws)],
                "means": [class_centroids(Xtr, ttr, ipc, C, seed=seed)]}
    out: dict[str, Any] = {}
    for name, sets in supports.items():
        best = max(REG_GRID, key=lambda r: statistics.fmean(kd.accuracy(S, math.log(r), "train")
                                                             for S in sets))
        accs = [kd.accuracy(S, math.log(best)) for S in sets]
        out.update({f"{name}_acc": statistics.fmean(accs),
                    f"{name}_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    f"{name}_setting": f"λ {best:g}"})
    out["full_acc"] = kd.accuracy(Xtr, kd.x0["log_reg"], labels=ttr)
    return out


def distilled_images(path: str | Path) -> torch.Tensor | None:
    """The distilled images (class-major rows) of a finished ``distillation-run`` folder, read
    from its last checkpoint (x = {"images", ...}: the images are the first leaf)."""
    blob, _, _ = CK.load_latest(Path(path) / CHECKPOINTS)
    if blob is None:
        return None
    images = blob["state"]["x"][0]
    return images if images.dim() == 2 else None


def image_grid(images: torch.Tensor, n_classes: int, out: Path, title: str = "") -> Path:
    """The images as a grid (one column per class, ``ipc`` rows), un-standardized to [0, 1]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..problems.distillation import MNIST_MEAN, MNIST_STD

    ipc = images.shape[0] // n_classes
    side = int(round(math.sqrt(images.shape[1])))
    pix = (images.detach().double().cpu() * MNIST_STD + MNIST_MEAN).clamp(0, 1)
    pix = pix.view(n_classes, ipc, side, side)
    cell = 0.8 if ipc <= 2 else 0.42  # inches per image (large grids: smaller cells, smaller files)
    fig = Figure(figsize=(cell * n_classes, cell * ipc + (0.35 if title else 0.1)))
    FigureCanvasAgg(fig)
    top = (0.8 if ipc == 1 else 0.95) if title else 0.99
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.05, hspace=0.05)
    for r in range(ipc):
        for c in range(n_classes):
            ax = fig.add_subplot(ipc, n_classes, r * n_classes + c + 1)
            ax.imshow(pix[c, r].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(str(c), fontsize=7, pad=1)
    if title:
        fig.suptitle(title, fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


@register
class Distillation(Table):
    name = "distillation"
    description = "dataset distillation on MNIST (1 and 10 images/class; unrolled and KIP) vs real images"
    reference = "Wang et al. 2018 (dataset distillation); Nguyen, Chen & Lee 2021 (KIP)"
    #: ``model``: the classifier of the unrolled sub-runs ("mlp": 64 hidden units; other widths via
    #: ``distillation-run --set model.hidden=...``)
    defaults = {"seed": 0, "ipc": [1, 10], "methods": list(METHODS), "steps": 300, "model": "linear"}
    choices = {"model": MODELS}

    def runs(self, cfg: dict[str, Any]) -> list[SubRun]:
        bad = [m for m in cfg["methods"] if m not in METHODS]
        if bad or any(int(k) < 1 for k in cfg["ipc"]):
            raise ConfigError(f"methods must be in {METHODS} and ipc ≥ 1; got {cfg['methods']}, {cfg['ipc']}")
        model = {"model.kind": cfg["model"], "model.hidden": 64 if cfg["model"] == "mlp" else 0}
        return [SubRun(label=f"{m}-ipc{k}" + (f"-{cfg['model']}" if m == "unrolled" else ""),
                       experiment="distillation-run", seed=cfg["seed"],
                       overrides={"method": m, "ipc": int(k), "steps": cfg["steps"],
                                  **(model if m == "unrolled" else {})})
                for k in cfg["ipc"] for m in cfg["methods"]]

    def summarize_table(self, cfg: dict[str, Any], results: list[SubResult]) -> str:
        rows, figs = [], []
        plots = results[0].path.parent.parent / "plots" if results else Path("plots")
        for r in results:
            f, e = r.final, r.extras
            method, ipc = r.run.overrides["method"], r.run.overrides["ipc"]
            if r.run.overrides.get("model.kind", "linear") != "linear":
                method += "-" + r.run.overrides["model.kind"]
            dist = f"{100 * f['test_acc']:.1f}"
            if "test_acc_std" in f:
                dist += f" ± {100 * f['test_acc_std']:.1f}"
            long_r = _pm2(e, "random_long") if "random_long_acc" in e else "—"
            long_m = _pm2(e, "means_long") if "means_long_acc" in e else "—"
            learned = f"lr {f['lr']:.3g}" if "lr" in f else f"λ {f['reg']:.2g}"
            rows.append([method, ipc, 10 * ipc, dist, _pm2(e, "random"), long_r, _pm2(e, "means"), long_m,
                         f"{100 * e['full_acc']:.1f}" if "full_acc" in e else "—", learned,
                         f"{r.info['solver_time_s']:.0f}"])
            imgs = distilled_images(r.path)
            if imgs is not None:
                figs.append(image_grid(imgs, 10, plots / f"distilled_{method}_ipc{ipc}.png",
                                       f"{method}, {ipc}/class: test acc {dist}%"))
        head = ["method", "ipc", "images", "distilled [%]", "random real [%]", "random real, long",
                "class means [%]", "class means, long", "KRR all train", "learned", "time [s]"]
        note = (f"## Dataset distillation on the bundled MNIST sample ({cfg['steps']} outer steps)\n\n"
                "unrolled: test accuracy of fresh models trained on the images (mean ± std over the "
                "evaluation "
                "inits); baselines: the same number of real images per class (random draws) / class k-means "
                "centroids, trained by the same steps ('long': more steps), each with the grid rate best on "
                "the training split. kip: KRR test accuracy.\n"
                f"Anchor (Wang et al. 2018, LeNet on full MNIST, 10 images): {WANG_FIXED} fixed init, "
                f"{WANG_RANDOM} random init.\n\n")
        return note + markdown_table(head, rows) + "".join(f"\nfigure: {p}" for p in figs) + "\n"


def _pm2(e: dict[str, Any], k: str) -> str:
    return f"{100 * e[k + '_acc']:.1f} ± {100 * e[k + '_std']:.1f}"
