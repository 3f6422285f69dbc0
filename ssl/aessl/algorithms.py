"""USB's algorithms, driven from our Accelerate loop.

USB's `AlgorithmBase.__init__` builds datasets, loaders, models and optimisers itself and
its `train()`/`process_batch` call `.cuda()`. We keep only the part we want, the algorithm:
a subclass created on the fly turns the builders into no-ops (the model is ours, prepared
by Accelerate), then the class's own `__init__` sets its arguments and registers its hooks
(thresholds, pseudo-labelling, distribution alignment). The loop calls `train_step` with
the batch keys its signature asks for and does backward/step itself.

Algorithm state that USB keeps in hooks (FlexMatch's per-class accuracy, FreeMatch's
thresholds, SoftMatch's Gaussian statistics...) is every tensor attribute of the hooks and
of the algorithm; `AlgorithmState` saves and restores exactly that with each checkpoint.
"""

from __future__ import annotations

import argparse
import inspect
import logging
from contextlib import nullcontext
from typing import Protocol, runtime_checkable

import torch

from .metrics import NUM_BRACKETS

log = logging.getLogger(__name__)

# USB vision algorithms that run with the batch we supply (x_lb, y_lb, idx_lb, idx_ulb,
# x_ulb_w, x_ulb_s) on CPU and GPU. The rest, and why not:
#   comatch, simmatch: allocate memory banks with .cuda() (GPU-only), comatch needs two strong views;
#   vat: .cuda() inside train_step;  dash: its own train() loop with CUDA events;
#   remixmatch: needs two strong views, rotated views and USB's labeled dataset object;
#   crmatch: needs rotation views and its own model wrapper; defixmatch: needs a strong labeled view.
SUPPORTED = (
    "supervised",
    "fixmatch",
    "flexmatch",
    "freematch",
    "softmatch",
    "uda",
    "pseudolabel",
    "adamatch",
    "mixmatch",
    "pimodel",
    "meanteacher",
)
UNSUPPORTED_WHY = {
    "comatch": "allocates its memory bank with .cuda() and needs two strong views",
    "simmatch": "allocates its memory bank with .cuda() and needs labeled-set indices into a bank",
    "vat": "calls .cuda() inside train_step",
    "dash": "replaces the whole training loop with its own (CUDA events)",
    "remixmatch": "needs two strong views, rotated views and USB's labeled dataset object",
    "crmatch": "needs rotation views and its own model wrapper",
    "defixmatch": "needs a strong view of every labeled image",
    "fullysupervised": "use 'supervised'",
}


# FlexMatch's per-bracket thresholds accept most of the pool whatever the label count. On the
# synthetic benchmark (test_resnet, 32 px; docs/results.md) that paid with 309 labels (+0.03
# QWK over the labels alone) and cost with 924 (-0.012 QWK, MAE worse on 8/8 replicates) and
# with 3,080 (-0.037 QWK, below on 5/6): the wrong pseudo-labels outweigh what the pool adds
# once the labels alone train a good model. Between 309 and 924 the crossover is unmeasured.
# FreeMatch's self-adaptive thresholds did the same with 924 (-0.013 QWK, MAE worse on 8/8);
# FixMatch's fixed 0.95 and RankMatch were neutral there.
ADAPTIVE_THRESHOLDS = ("flexmatch", "rankflexmatch", "freematch")
MANY_LABELS = 500  # between the measured 309 (gain) and 924 (loss): not a measured boundary


def label_count_advice(name: str, n_labels: int) -> str | None:
    """A warning for an algorithm measured to do worse than the labels alone at this many
    training labels, or None."""
    if name not in ADAPTIVE_THRESHOLDS or n_labels < MANY_LABELS:
        return None
    return (f"algorithm.name={name} with {n_labels} training labels: on the synthetic benchmark FlexMatch's "
            "and FreeMatch's adaptive thresholds fell below the labels alone from 924 labels on (with 309 they "
            "gained); with this many, rankmatch (the default) or fixmatch did no harm there. Compare with "
            "algorithm.name=supervised on your data before trusting it (docs/results.md)")


def _registry():
    import semilearn  # noqa: F401  (importing it fills the registry)
    from semilearn.core.utils import ALGORITHMS

    from . import algos  # noqa: F401  (ours: each module registers itself; aessl/algos/__init__.py)

    return ALGORITHMS


def available() -> list[str]:
    reg = _registry()
    own = [k for k in reg._dict if k not in SUPPORTED and k not in UNSUPPORTED_WHY and _is_own(reg[k])]
    return list(SUPPORTED) + own


def _is_own(cls) -> bool:
    return cls.__module__.startswith("aessl.")


class AlgorithmArgumentError(ValueError):
    pass


def algorithm_args(cls, name: str, user_args: dict, common: dict) -> argparse.Namespace:
    """USB's argument namespace: common fields, then the algorithm's declared defaults,
    then the user's `algorithm.args` (an unknown one is an error naming it)."""
    declared = {}
    for a in cls.get_argument() or []:
        declared[a.name.lstrip("-")] = a.default
    for key in user_args:
        if key not in declared:
            raise AlgorithmArgumentError(
                f"algorithm.args.{key}: {name} has no argument {key!r}; it takes {sorted(declared) or 'none'}"
            )
    values = {**common, **declared, **dict(user_args)}
    return argparse.Namespace(**values)


def check_algorithm(name: str, user_args: dict) -> None:
    """What build_algorithm would refuse about `name` and its algorithm.args, without a model:
    AlgorithmArgumentError naming it (a sweep checks every cell with this before training)."""
    reg = _registry()
    if name in UNSUPPORTED_WHY:
        raise AlgorithmArgumentError(f"algorithm {name!r} is not supported here: {UNSUPPORTED_WHY[name]}")
    if name not in reg._dict or (name not in SUPPORTED and not _is_own(reg[name])):
        raise AlgorithmArgumentError(f"unknown algorithm {name!r}; choose one of {available()}")
    algorithm_args(reg[name], name, user_args, {})


def build_algorithm(name: str, model, *, user_args: dict, num_train_iter: int, lambda_u: float,
                    ulb_dest_len: int, lb_dest_len: int, lb_prior=None, ema_m: float = 0.999,
                    rank: int = 0, world_size: int = 1):
    """An instance of USB algorithm `name` (or one of ours) bound to `model`."""
    check_algorithm(name, user_args)
    cls = _registry()[name]
    common = dict(
        algorithm=name, num_classes=NUM_BRACKETS, ema_m=ema_m, epoch=1, num_train_iter=num_train_iter,
        num_eval_iter=num_train_iter, num_log_iter=num_train_iter, ulb_loss_ratio=lambda_u, use_cat=True,
        amp=False, clip_grad=0.0, save_name="", save_dir="", resume=False, gpu=None, rank=rank,
        distributed=world_size > 1, world_size=world_size, ulb_dest_len=ulb_dest_len, lb_dest_len=lb_dest_len,
        use_wandb=False, use_aim=False, lb_prior=lb_prior,
    )
    args = algorithm_args(cls, name, user_args, common)

    class Bound(cls):
        # USB's builders become no-ops: data, model and optimiser are the loop's.
        def set_dataset(self):
            return None

        def set_data_loader(self):
            return None

        def set_model(self):
            return model

        def set_ema_model(self):
            return None

        def set_optimizer(self):
            return None, None

    Bound.__name__ = cls.__name__
    algo = Bound(args, net_builder=None, tb_log=None, logger=log)
    # Autocast is Accelerate's job (prepare() wraps the model's forward); USB's own
    # torch.cuda.amp context would be wrong on CPU.
    algo.amp_cm = nullcontext
    algo.epoch = 0
    if "self.ema." in inspect.getsource(cls):
        # Mean Teacher reads its teacher through USB's EMA object (apply_shadow/restore).
        from semilearn.core.utils import EMA

        algo.ema = EMA(model, ema_m)
        algo.ema.register()
    return algo


# Algorithms whose train_step forwards torch.cat((x_lb, x_ulb_w, x_ulb_s)) once and reads
# the weak view's logits only detached (as pseudo-label source): the EMA teacher can stand
# in for those rows. mixmatch, pimodel and meanteacher forward the views separately
# (meanteacher has its own EMA teacher); pseudolabel uses no weak view.
EMA_TEACHER_ALGORITHMS = ("fixmatch", "flexmatch", "freematch", "softmatch", "uda", "adamatch",
                          "rankmatch", "rankflexmatch", "ordinal")


class EmaTeacher(torch.nn.Module):
    """The model an algorithm sees with algorithm.teacher=ema.

    The student forwards the whole (labeled, weak, strong) batch as always (gradients,
    batch-norm statistics); then the weak view's rows of the logits, the ones every
    algorithm in EMA_TEACHER_ALGORITHMS turns into pseudo-labels, thresholds and
    distribution estimates, are replaced by the EMA teacher's logits (eval mode, no
    gradient). The teacher is the model the loop evaluates and exports, so the pool images
    training accepted are the ones export accepts. `views(n_lb, n_ulb)` is set by the loop
    before each step; a forward of any other shape passes through untouched."""

    def __init__(self, student: torch.nn.Module, ema, autocast=nullcontext):
        super().__init__()
        self.student = student
        self._ema = (ema,)  # not a submodule: the optimiser and checkpoints must not see it twice
        self._autocast = autocast
        self.n_lb = self.n_ulb = None

    def views(self, n_lb: int | None, n_ulb: int | None) -> None:
        self.n_lb, self.n_ulb = n_lb, n_ulb

    def forward(self, x, *args, **kwargs):
        out = self.student(x, *args, **kwargs)
        n_lb, n_ulb = self.n_lb, self.n_ulb
        if n_ulb is None or x.shape[0] != n_lb + 2 * n_ulb:
            return out
        teacher = self._ema[0].module
        was_training = teacher.training
        teacher.eval()
        with torch.no_grad(), self._autocast():
            weak = teacher(x[n_lb:n_lb + n_ulb])["logits"]
        teacher.train(was_training)
        logits = out["logits"]
        logits = torch.cat((logits[:n_lb], weak.to(logits.dtype), logits[n_lb + n_ulb:]))
        return {**out, "logits": logits}


def use_ema_teacher(algo, name: str, model, ema, autocast=nullcontext) -> None:
    """Let the EMA teacher make `algo`'s pseudo-labels (algorithm.teacher=ema)."""
    if name not in EMA_TEACHER_ALGORITHMS:
        raise AlgorithmArgumentError(
            f"algorithm.teacher: 'ema' works with {', '.join(EMA_TEACHER_ALGORITHMS)}, not {name!r} "
            "(it reads its unlabeled views through other forwards, or has no unlabeled view)")
    algo.model = EmaTeacher(model, ema, autocast)


def set_views(algo, batch: dict) -> None:
    """Tell an EMA-teacher model how this step's batch splits into labeled and weak rows."""
    if isinstance(getattr(algo, "model", None), EmaTeacher):
        w = batch.get("x_ulb_w")
        lb = batch.get("x_lb")
        algo.model.views(None if lb is None else len(lb), None if w is None else len(w))


def step_inputs(algo, batch: dict) -> dict:
    """The batch keys the algorithm's train_step takes, nothing else."""
    params = inspect.signature(algo.train_step).parameters
    return {k: v for k, v in batch.items() if k in params and v is not None}


def after_optimizer_step(algo) -> None:
    algo.it += 1
    if getattr(algo, "ema", None) is not None:
        algo.ema.update()


def log_figures(algo, log_dict: dict) -> dict:
    """train/unsup_loss -> unsup_loss, and the algorithm's thresholds where it has them."""
    out = {}
    for k, v in (log_dict or {}).items():
        key = k.split("/", 1)[-1]
        out[key] = float(v.item() if torch.is_tensor(v) else v)
    if "util_ratio" in out:
        out["pseudo_label_rate"] = out.pop("util_ratio")
    out.update(threshold_figures(algo))
    return out


@runtime_checkable
class AcceptanceRule(Protocol):
    """What an algorithm of ours exposes so that export and report accept pool images the
    way it accepted them in training (aessl/algos/ordinal.py is one):

    current_thresholds()  the per-bracket confidence thresholds now, a tensor of 11
    conf_radius           confidence = probability mass within +-conf_radius brackets of
                          the argmax (0: the argmax's own probability, USB's rule)

    model/config.json records both (`thresholds`, `confidence_radius`); export and report
    read them from there, never from the algorithm. USB's own algorithms do not implement
    this; USB_THRESHOLDS reads theirs from their hooks instead."""

    conf_radius: int

    def current_thresholds(self) -> torch.Tensor: ...


def _freematch_thresholds(algo) -> torch.Tensor:
    """Self-adaptive: the global threshold time_p scaled by each class's share of p_model."""
    masking = algo.hooks_dict["MaskingHook"]
    return masking.time_p * (masking.p_model / torch.max(masking.p_model))


def _flexmatch_thresholds(algo) -> torch.Tensor:
    """Curriculum: p_cutoff scaled by each class's learning effect (convex mapping)."""
    acc = algo.hooks_dict["MaskingHook"].classwise_acc
    return (algo.p_cutoff * (acc / (2.0 - acc))).clamp(min=getattr(algo, "thresh_min", 0.0))  # rankflexmatch's floor


# USB algorithms whose thresholds live in their hooks, by algorithm name. Any other with a
# p_cutoff uses it for every bracket; one without has no thresholds (supervised).
USB_THRESHOLDS = {"freematch": _freematch_thresholds, "flexmatch": _flexmatch_thresholds,
                  "rankflexmatch": _flexmatch_thresholds}  # aessl/algos/rankmatch.py: FlexMatch's hooks


def current_thresholds(algo) -> torch.Tensor | None:
    """The algorithm's per-bracket thresholds now, or None when it has none."""
    if isinstance(algo, AcceptanceRule):
        return algo.current_thresholds()
    reader = USB_THRESHOLDS.get(getattr(algo, "algorithm", None))
    if reader is not None:
        return reader(algo)
    if hasattr(algo, "p_cutoff"):
        return torch.full((NUM_BRACKETS,), float(algo.p_cutoff))
    return None


def confidence_radius(algo) -> int:
    """The algorithm's confidence window (AcceptanceRule.conf_radius); 0 for USB's."""
    return int(algo.conf_radius) if isinstance(algo, AcceptanceRule) else 0


def threshold_figures(algo) -> dict:
    """Current per-bracket thresholds (where the algorithm has them) as flat keys."""
    thr = current_thresholds(algo)
    if thr is None:
        return {}
    thr = torch.as_tensor(thr, dtype=torch.float32).flatten().cpu()
    if thr.numel() != NUM_BRACKETS:
        return {}
    return {f"threshold_{b}": t for b, t in enumerate(thr.tolist())}


def thresholds_for_export(algo) -> list[float]:
    fig = threshold_figures(algo)
    if not fig:
        return []
    return [round(fig[f"threshold_{b}"], 6) for b in range(NUM_BRACKETS)]  # float32 noise off


class AlgorithmState:
    """state_dict/load_state_dict over every tensor the algorithm, its hooks and USB's EMA
    keep. Each process writes it beside Accelerate's save_state files as its own
    checkpoint file (checkpoints.write_rank_state; aessl/loop.py's save_checkpoint): the
    hooks' tensors differ per process (FlexMatch's per-image slots cover its own draws)."""

    def __init__(self, algo):
        self.algo = algo

    def _owners(self):
        yield "algo", self.algo
        for name, hook in getattr(self.algo, "hooks_dict", {}).items():
            yield f"hook.{name}", hook
        if getattr(self.algo, "ema", None) is not None:
            yield "usb_ema", self.algo.ema

    def state_dict(self) -> dict:
        state = {"it": torch.tensor(self.algo.it)}
        for prefix, owner in self._owners():
            for attr, value in vars(owner).items():
                if attr in ("model", "ema_model", "args"):
                    continue
                if torch.is_tensor(value):
                    state[f"{prefix}.{attr}"] = value.detach().cpu().clone()
                elif attr == "shadow" and isinstance(value, dict):
                    for k, v in value.items():
                        state[f"{prefix}.shadow.{k}"] = v.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.algo.it = int(state["it"])
        owners = dict(self._owners())
        for key, value in state.items():
            if key == "it":
                continue
            if ".shadow." in key:
                prefix, name = key.split(".shadow.", 1)
                shadow = owners[prefix].shadow
                shadow[name] = value.to(shadow[name].device) if name in shadow else value
                continue
            prefix, attr = key.rsplit(".", 1)
            owner = owners.get(prefix)
            if owner is None:
                raise KeyError(f"checkpoint holds state for {prefix!r}, which this algorithm does not have")
            current = getattr(owner, attr, None)
            device = current.device if torch.is_tensor(current) else value.device
            setattr(owner, attr, value.to(device))
