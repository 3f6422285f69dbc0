"""A training run's named steps; ssl/train.py's main wires them top to bottom:

    start_run -> find_resume -> load_data -> mode.prepare -> mode.build_module ->
    build_training -> resume -> write_run_files -> mode.loaders -> Trainer.train -> write_model

Every step that meets input it cannot use raises RunRefused (or one of the user-facing
errors in USER_ERRORS) with one message; main turns it into exit code 2 and removes a run
folder this run created and left empty. The order of the steps is part of the contract:
building the model, the EMA copy, the algorithm and the loaders draw from the random
generators, and a resumed run restores them last (Trainer.restore) so that it continues
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm.utils
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, parse_flag_from_env, set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from . import algorithms as algos
from . import checkpoints as ckpt
from . import corrections
from . import faults
from . import modelcard
from . import pseudo as pseudo_labels
from . import runfolder
from .config import DEFAULTS, save_config, to_dict
from .data import (DataSourceError, LabeledSetError, bracket_histogram, load_pool, load_scored_set, pool_length,
                   row_name, row_source, split_by_image, unreadable_run_message)
from .heads import EmbeddingError
from .images import UnreadableImage, load_image
from .locks import FolderLock, FolderLocked
from .logs import setup_logging
from .metrics import bracket_of, compute_metrics, default_top_k
from .models import WeightsUnavailable, save_model_folder
from .overlap import check_leakage
from .scoring import bracket_probs, mixed_precision_dtype
from .targets import SupervisedTarget, get_target
from .sources import resolve_sources

log = logging.getLogger("train")


class RunRefused(Exception):
    """The run cannot go on; the message says why and what to do."""


# Errors whose message is meant for the user: the run stops with it and exit code 2.
USER_ERRORS = (RunRefused, LabeledSetError, DataSourceError, EmbeddingError, WeightsUnavailable, FolderLocked,
               algos.AlgorithmArgumentError,
               FloatingPointError)  # a non-finite loss (train_one_step): its message says what to change


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """The run's config, its Accelerator and its folder (one live writer at a time)."""

    cfg: object
    accelerator: Accelerator
    run_dir: Path
    existed: bool  # the folder held something before this run: never removed on refusal
    lock: FolderLock | None = None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def broadcast(self, value):
        """The main process's `value` on every process."""
        return broadcast_value(value, self.world)

    def refuse(self, exc: Exception) -> int:
        """Exit 2 with one clear message; a run folder this run created and left empty goes."""
        if self.is_main:
            print(f"error: {user_message(exc)}", file=sys.stderr)
            if self.lock is not None:
                self.lock.release()
            if not self.existed and self.run_dir.is_dir() and {p.name for p in self.run_dir.iterdir()} <= {".lock"}:
                (self.run_dir / ".lock").unlink(missing_ok=True)
                self.run_dir.rmdir()
        return 2

    def finish(self) -> None:
        self.accelerator.end_training()
        if self.lock is not None:
            self.lock.release()


def start_run(cfg) -> Run:
    """The Accelerator, logging and the seed. The run folder is chosen before the Accelerator
    exists (trackers need it): the main process picks it and every process writes to that one."""
    tcfg = cfg.train
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # (it does not read the variable itself)
    out = [cfg.output_dir or (runfolder.new_run_name() if state.is_main_process else None)]
    if state.num_processes > 1:
        broadcast_object_list(out, from_process=0)
    run_dir = Path(out[0])
    accelerator = Accelerator(
        mixed_precision=tcfg.mixed_precision,
        gradient_accumulation_steps=tcfg.grad_accum,
        log_with=None if tcfg.tracker in (None, "none") else tcfg.tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
    )
    setup_logging(accelerator.is_main_process)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise
    set_seed(cfg.seed)
    existed = run_dir.exists() and any(p.name != ".lock" for p in run_dir.iterdir())
    return Run(cfg, accelerator, run_dir, existed)


def find_resume(run: Run) -> Path | None:
    """Take the run folder's lock (a second run into it is refused, not interleaved) and
    find the checkpoint to resume from, refusing a resume whose settings changed."""
    try:
        run.lock = FolderLock.acquire_for(run.run_dir, "run folder", run.is_main,
                                          broadcast_object_list if run.world > 1 else None)
    except FolderLocked:
        run.existed = True  # someone else's folder: leave it be
        raise
    cfg, run_dir = run.cfg, run.run_dir
    latest = ckpt.latest_checkpoint(run_dir)
    resume_from = latest if cfg.resume else None
    # A checkpoint without metrics is a run killed before its first evaluation: starting it
    # again from step 0 would overwrite its config.yaml, and a later resume=true would then
    # continue the old weights under the new settings.
    if not cfg.resume and ((run_dir / "metrics.jsonl").exists() or latest is not None):
        raise RunRefused(f"{run_dir} already holds a run; resume it with resume=true or choose another output_dir=")
    if resume_from is not None:
        refusal = resume_refusal(run_dir, resume_from, cfg, run.world)
        if refusal:
            raise RunRefused(refusal)
    return resume_from


def resume_refusal(run_dir: Path, checkpoint: Path, cfg, world: int) -> str | None:
    """Why this run cannot resume `checkpoint` with this config, or None. Only settings that
    do not change what is learned may differ (runfolder.RESUME_HARMLESS)."""
    stored_file = run_dir / "config.yaml"
    stored = (yaml.safe_load(stored_file.read_text()) or {}) if stored_file.is_file() else None
    if stored is not None:
        changed = runfolder.resume_changes(stored, to_dict(cfg), DEFAULTS)
        if changed:
            return (f"{run_dir} was trained with other settings; a resumed run must keep them (or start a new "
                    "output_dir=). Changed: " + "; ".join(changed))
        stored_workers = stored.get("data", {}).get("num_workers")
        if cfg.data.streaming and stored_workers is not None and int(stored_workers) != cfg.data.num_workers:
            return (f"{run_dir} streams its pool with data.num_workers={stored_workers}; each worker reads its own "
                    "part of the stream, so resume with the same number")
    saved_world = json.loads((checkpoint / "progress.json").read_text()).get("num_processes", world)
    if int(saved_world) != world:
        return (f"{checkpoint} was written by {saved_world} process(es) and this run has {world}: each process "
                "draws its own slice of every batch, so resume with the same number of processes")
    return None


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    src: dict  # resolved sources (aessl.sources)
    scored: object  # the labeled set as read
    is_test: np.ndarray | None  # the carved test split (None: data.test was given)
    train_set: object
    test_set: object
    pool: object | None
    pool_size: int | None  # None: a stream of unknown length
    leakage: dict | None = None
    pseudo: pseudo_labels.PseudoSet | None = None
    pseudo_info: dict | None = None
    corrections: dict | None = None  # what data.corrections changed (run.json)


def load_data(run: Run, resume_from: Path | None) -> Data:
    """The labeled set, its test split, the pool and an export's pseudo rows, checked for
    overlap with the test set."""
    cfg, dcfg = run.cfg, run.cfg.data
    src = resolve_sources(dcfg, run.is_main, run.accelerator.wait_for_everyone)
    scored = load_scored_set(src["labeled"])
    is_test = None
    if src["test"]:
        train_set, test_set = scored, load_scored_set(src["test"])
    else:
        is_test = carve_test_split(run, scored, resume_from)
        train_set, test_set = scored.select(np.flatnonzero(~is_test)), scored.select(np.flatnonzero(is_test))
    corrected = None
    if dcfg.corrections:  # a review's decisions (aessl/corrections.py): labels in, rejected images out
        train_set, corrected = apply_corrections(run, dcfg.corrections, train_set, test_set, resume_from)
    pool = None
    if src["unlabeled"] and cfg.algorithm.name != "supervised":
        pool = load_pool(src["unlabeled"], streaming=dcfg.streaming, limit=dcfg.max_unlabeled)
        if corrected is not None:
            pool, corrected["pool_images_removed"] = corrections.drop_from_pool(pool, corrected["rejected_paths"])
        if hasattr(pool, "__len__"):
            probe_pool(pool)
    if len(test_set) == 0:
        raise RunRefused("the test split is empty; give data.test= or a larger labeled set")
    data = Data(src, scored, is_test, train_set, test_set, pool, None if pool is None else pool_length(pool),
                corrections=corrected)
    data.leakage = run.broadcast(check_leakage(test_set["path"], train_set["path"], pool) if run.is_main else None)
    refusal = report_leakage(data.leakage, allow=dcfg.allow_test_overlap)
    if refusal:
        raise RunRefused(refusal)
    if dcfg.pseudo_labels:  # an export's rows join the labels with soft targets (aessl/pseudo.py)
        data.pseudo, data.pseudo_info, refusal = pseudo_labels.prepare(
            cfg, train_set, test_set, run.run_dir if resume_from is not None else None, run.is_main, run.broadcast,
            rejected=sorted(corrected["rejected_paths"]) if corrected else ())
        if refusal:
            raise RunRefused(refusal)
    return data


def apply_corrections(run: Run, files, train_set, test_set, resume_from: Path | None):
    """(train set with data.corrections applied, what changed): read on the main process and
    handed to the others, so every process trains on the same rows."""
    answer = None
    if run.is_main:
        try:
            corr = corrections.read_corrections(corrections.files_of(files))
            table, info = corrections.apply_to_labels(corr, train_set, test_set["path"])
            before = (runfolder.read_run_info(run.run_dir) or {}).get("corrections") if resume_from else None
            refusal = corrections.resume_refusal(before, info)
            answer = (table, {**info, "rejected_paths": sorted(corr.rejected)}, refusal)
        except corrections.CorrectionsError as exc:
            answer = (None, None, str(exc))
        except LabeledSetError as exc:
            answer = (None, None, f"data.corrections: {exc}")
    table, info, refusal = run.broadcast(answer)
    if refusal:
        raise RunRefused(refusal)
    log.info("corrections: %d image(s) decided in %s: %d accepted, %d re-scored, %d rejected | labels: %d added, "
             "%d replaced, %d removed, %d test image(s) left out", info["images"], ", ".join(info["files"]),
             info["accept"], info["rescore"], info["reject"], info["labels_added"], info["labels_replaced"],
             info["labels_removed"], info["test_images_left_out"])
    return table, info


def carve_test_split(run: Run, scored, resume_from: Path | None) -> np.ndarray:
    """By image (raters' rows stay together), seeded by the data's own key, not the run's; a
    resumed run reads back the split it wrote."""
    split = runfolder.read_split(run.run_dir) if resume_from is not None else None
    if split is not None:
        test_paths = set(runfolder.split_paths(split, "test"))
        return np.array([p in test_paths for p in scored["path"]])
    return split_by_image(scored["path"], scored["score"], run.cfg.data.test_fraction, run.cfg.data.split_seed)


def probe_pool(pool, tries: int = 32) -> None:
    """Fail before training when a pool is entirely unreadable: decode up to `tries` rows spread
    over it and raise DataSourceError if none decodes (a few bad files are skipped later)."""
    n = len(pool)
    bad = []
    for i in np.unique(np.linspace(0, n - 1, num=min(n, tries)).astype(int)):
        row = pool[int(i)]
        try:
            load_image(row_source(row), draft_size=64)
            return
        except UnreadableImage as exc:
            bad.append((row_name(row), exc.reason))
    raise DataSourceError(unreadable_run_message("unlabeled", len(bad), n if len(bad) >= n else None, bad))


def report_leakage(leakage: dict, allow: bool) -> str | None:
    """Warn about test images met again in training data or the pool; a test set that is
    wholly inside the training set is refused (its metrics would mean nothing) unless allowed."""
    train, pool = leakage.get("test_vs_train"), leakage.get("test_vs_pool")
    for what, found in (("training set", train), ("unlabeled pool", pool)):
        if found and found.get("test_images_hit"):
            log.warning("%d of %d test images are also in the %s (%d same file, %d same content), e.g. %s",
                        found["test_images_hit"], found["test_images"], what, found["same_file"],
                        found["same_content"], "; ".join(found["examples"][:3]))
    if train and train["test_images"] and train["test_images_hit"] == train["test_images"] and not allow:
        return (f"every one of the {train['test_images']} test images is also a training image (e.g. "
                f"{'; '.join(train['examples'][:3])}): data.test must be images the model never trains on "
                "(set data.allow_test_overlap=true to train anyway)")
    return None


# --------------------------------------------------------------------------- model, EMA, optimiser, algorithm


@dataclass
class Training:
    model: torch.nn.Module  # prepared by Accelerate (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: timm.utils.ModelEmaV3  # the teacher that is evaluated and exported
    algo: object
    algo_state: algos.AlgorithmState
    uses_pool: bool
    train_histogram: np.ndarray
    index_size: int  # per-image slots of the pool (FlexMatch); see StreamingPool


def build_training(run: Run, data: Data, model: torch.nn.Module) -> Training:
    cfg, tcfg = run.cfg, run.cfg.train
    if tcfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=tcfg.lr, momentum=tcfg.momentum, nesterov=True,
                                    weight_decay=tcfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    steps = tcfg.steps
    # Not prepared by Accelerate (it would step once per process); stepped once per update.
    scheduler = get_cosine_schedule_with_warmup(optimizer, tcfg.warmup_steps, steps)
    lb_hist = np.asarray(bracket_histogram(data.train_set["bracket"]), dtype=np.float64)
    # The model is on its device (and wrapped for DDP) before anything copies it: the EMA
    # teacher, USB's EMA (meanteacher) and the algorithm's hooks must live where it lives.
    model, optimizer = run.accelerator.prepare(model, optimizer)
    ema = timm.utils.ModelEmaV3(run.accelerator.unwrap_model(model), decay=tcfg.ema_decay, use_warmup=True)
    index_size = int(data.pool_size or cfg.data.stream_index_size)
    target = get_target(cfg.model.target)
    if target.name != "classification" and cfg.algorithm.name == "supervised":
        algo = SupervisedTarget(model, target)  # the target's own supervised loss (aessl/targets.py)
    else:
        algo = algos.build_algorithm(
            cfg.algorithm.name, model, user_args=dict(cfg.algorithm.args), num_train_iter=steps,
            lambda_u=cfg.algorithm.lambda_u, ulb_dest_len=index_size, lb_dest_len=len(data.train_set),
            lb_prior=(lb_hist + 1) / (lb_hist + 1).sum(), rank=run.rank, world_size=run.world,
        )
        if target.name != "classification":  # our ordinal algorithm (config.check_target allows no other)
            algo.target = target
    uses_pool = bool({"x_ulb_w", "x_ulb_s"} & set(algos.step_inputs(algo, {"x_ulb_w": 0, "x_ulb_s": 0})))
    if uses_pool and data.pool is None:
        raise RunRefused(f"algorithm {cfg.algorithm.name!r} needs an unlabeled pool: set data.unlabeled=")
    if cfg.algorithm.teacher == "ema":
        algos.use_ema_teacher(algo, cfg.algorithm.name, model, ema, run.accelerator.autocast)
    return Training(model, optimizer, scheduler, ema, algo, algos.AlgorithmState(algo), uses_pool, lb_hist, index_size)


# --------------------------------------------------------------------------- resume


@dataclass
class Progress:
    start_step: int = 0
    skipped: dict = field(default_factory=dict)  # image name -> reason, every unreadable image met so far
    stream_batches: int | None = None  # unlabeled batches taken from a streamed pool (can outnumber steps)


def resume(run: Run, training: Training, resume_from: Path | None, skipped: dict) -> Progress:
    """The EMA teacher, the algorithm's state, the schedule and the loop's counters of the
    checkpoint (the model, optimiser and random generators come back in Trainer.restore)."""
    progress = Progress(skipped=skipped)
    if run.is_main:
        ckpt.clean_temp(run.run_dir)
    if resume_from is not None:
        tensors, saved = ckpt.read_extras(resume_from, ["ema"])
        training.ema.load_state_dict(tensors["ema"])
        training.algo_state.load_state_dict(ckpt.read_rank_state(resume_from, "algorithm", run.rank))
        training.scheduler.load_state_dict(saved["scheduler"])
        progress.start_step, progress.skipped = int(saved["step"]), dict(saved["skipped"])
        if (resume_from / ckpt.rank_file("loop", run.rank)).is_file():
            progress.stream_batches = int(ckpt.read_rank_state(resume_from, "loop", run.rank)["stream_batches"])
        log.info("resumed from %s at step %d", resume_from, progress.start_step)
    elif run.cfg.resume:
        log.info("resume=true but %s has no checkpoint yet: starting from step 0", run.run_dir)
    if progress.stream_batches is None:
        progress.stream_batches = progress.start_step * run.cfg.train.grad_accum
    return progress


def write_run_files(run: Run, data: Data, training: Training, embedding_stats: dict | None,
                    resume_from: Path | None, start_step: int) -> None:
    """config.yaml, split.csv (a carved split), run.json; metrics past the resumed step go."""
    cfg, run_dir = run.cfg, run.run_dir
    if run.is_main:
        save_config(cfg, run_dir / "config.yaml")
        if data.is_test is not None:
            runfolder.write_split(run_dir, data.scored["path"], data.scored["score"], data.is_test)
        runfolder.write_run_info(run_dir, {
            "num_processes": run.world, "mixed_precision": cfg.train.mixed_precision,
            "device": str(run.accelerator.device), "sources": data.src, "train_images": len(data.train_set),
            "test_images": len(data.test_set), "pool_images": data.pool_size,
            "train_histogram": training.train_histogram.astype(int).tolist(), "algorithm": cfg.algorithm.name,
            "resumed_from": str(resume_from) if resume_from else None, "embedding": embedding_stats,
            "leakage": data.leakage, "split_seed": None if data.src["test"] else cfg.data.split_seed,
            "pseudo_labels": data.pseudo_info,
            "corrections": None if data.corrections is None else
            {k: v for k, v in data.corrections.items() if k != "rejected_paths"},
        })
        runfolder.keep_metrics_up_to(run_dir, start_step)  # later evaluations will be redone
    if run.accelerator.log_with:
        flat = runfolder.flat(to_dict(cfg)).items()
        run.accelerator.init_trackers("aessl", config={k: v for k, v in flat if isinstance(v, (int, float, str, bool))})


def announce(run: Run, data: Data) -> None:
    if run.is_main:
        cfg = run.cfg
        log.info("run folder %s | %d train / %d test scored images, pool %s | %d process(es) on %s | %s on %s",
                 run.run_dir, len(data.train_set), len(data.test_set), data.pool_size, run.world,
                 run.accelerator.device, cfg.algorithm.name, cfg.model.name)
        advice = algos.label_count_advice(cfg.algorithm.name, len(data.train_set))
        for warning in [advice] * bool(advice) + bracket_warnings(data.train_set["bracket"],
                                                                  bracket_of(data.test_set["score"])):
            log.warning(warning)


def bracket_warnings(train_brackets, test_brackets) -> list[str]:
    """What a run on one bracket cannot tell: a model that saw one bracket predicts only it,
    and on a test set of one bracket QWK and Spearman measure no ranking (QWK 1.0 is easy)."""
    out = []
    for name, brackets, why in (("training", train_brackets, "the model can learn to predict only that"),
                                ("test", test_brackets, "QWK and Spearman cannot measure a ranking")):
        present = sorted({int(b) for b in brackets})
        if len(present) == 1:
            out.append(f"the {name} set holds one bracket only ({present[0]}): {why}")
    return out


def test_rows(run: Run, data: Data) -> np.ndarray:
    """This process's share of the test set."""
    return np.arange(run.rank, len(data.test_set), run.world)


# --------------------------------------------------------------------------- the loop


class Trainer:
    """The loop: train_one_step, evaluate, save_checkpoint, until train.steps."""

    def __init__(self, run: Run, training: Training, batches, progress: Progress, data: Data, rows: np.ndarray):
        self.run, self.t, self.batches, self.progress = run, training, batches, progress
        self.test_rows, self.test_scores = rows, np.asarray(data.test_set["score"], dtype=np.float64)
        self.steps = run.cfg.train.steps
        self.window: dict[str, list] = {}
        self.last_metrics = None
        self.last_probs = None  # the last evaluation's test-set probabilities (main process): the model card's histogram
        self.eval_seconds = self.save_seconds = self.loop_seconds = 0.0  # the loop's own time apart (timing.json)
        self.t0 = time.time()

    def restore(self, resume_from: Path | None) -> None:
        """Last, after the loaders exist: it restores the random generators too, and building
        the loaders draws from them (a worker base seed), which an uninterrupted run did before
        its checkpoint was taken. Dropout and random algorithms then continue identically."""
        if resume_from is not None:
            self.run.accelerator.load_state(str(resume_from))

    def train(self) -> dict | None:
        """Run the remaining steps; the last evaluation's metrics (None when none ran)."""
        tcfg, acc = self.run.cfg.train, self.run.accelerator
        self.t.model.train()
        bar = tqdm(total=self.steps, initial=self.progress.start_step, disable=not acc.is_main_process, desc="train",
                   dynamic_ncols=True)
        self.t0 = time.time()
        try:
            for step in range(self.progress.start_step, self.steps):
                self.train_one_step(step)
                bar.update(1)
                done = step + 1
                if done % tcfg.log_every == 0 or done == self.steps:
                    self.log_figures(bar, done)
                if done % tcfg.eval_every == 0 or done == self.steps:
                    self.evaluate_and_record(bar, done)
                if done % tcfg.save_every == 0 or done == self.steps:
                    self.save_checkpoint(done)
                faults.kill_point(faults.KILL_AT_STEP, done)  # the resume tests: die like a SIGKILL would
        finally:
            bar.close()
        self.loop_seconds = time.time() - self.t0 - self.eval_seconds - self.save_seconds
        return self.last_metrics

    def next_batch(self) -> dict:
        """One labeled batch, plus one unlabeled batch when the algorithm uses the pool."""
        batch = self.next_readable(self.batches.labeled)
        if self.batches.unlabeled is not None:
            batch.update(self.next_readable(self.batches.unlabeled, count_stream=True))
        return {k: v.to(self.run.accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def next_readable(self, it, count_stream: bool = False) -> dict:
        b = next(it)
        self.progress.stream_batches += int(count_stream)
        while count_stream and "x_ulb_w" not in b:  # a streamed batch of unreadable images only: take the next
            self.note_skipped(b.pop("skipped"))
            b = next(it)
            self.progress.stream_batches += 1
        self.note_skipped(b.pop("skipped"))
        return b

    def note_skipped(self, items) -> None:
        for name, reason in items:
            if name not in self.progress.skipped:
                self.progress.skipped[name] = reason
                log.warning("skipping unreadable image %s: %s", name, reason)

    def train_one_step(self, step: int) -> None:
        """One optimiser update (train.grad_accum micro-batches), the schedule, the EMA teacher."""
        tcfg, acc, t = self.run.cfg.train, self.run.accelerator, self.t
        for _ in range(tcfg.grad_accum):
            batch = self.next_batch()
            algos.set_views(t.algo, batch)
            with acc.accumulate(t.model):
                out, log_dict = t.algo.train_step(**algos.step_inputs(t.algo, batch))
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower train.lr or check the data")
                acc.backward(loss)
                if acc.sync_gradients and tcfg.clip_grad > 0:
                    acc.clip_grad_norm_(t.model.parameters(), tcfg.clip_grad)
                t.optimizer.step()
                t.optimizer.zero_grad(set_to_none=True)
        t.scheduler.step()
        t.ema.update(acc.unwrap_model(t.model), step=step + 1)
        algos.after_optimizer_step(t.algo)
        for k, v in algos.log_figures(t.algo, log_dict).items():
            self.window.setdefault(k, []).append(v)

    def log_figures(self, bar, done: int) -> None:
        figures = {k: float(np.mean(v)) for k, v in self.window.items()}
        bar.set_postfix({k: f"{v:.3g}" for k, v in figures.items() if k in ("total_loss", "sup_loss", "pseudo_label_rate")})
        if self.run.accelerator.log_with:
            lr = self.t.scheduler.get_last_lr()[0]
            self.run.accelerator.log({f"train/{k}": v for k, v in figures.items()} | {"train/lr": lr}, step=done)

    def evaluate_and_record(self, bar, done: int) -> None:
        figures = {k: float(np.mean(v)) for k, v in self.window.items()}
        figures["lr"] = float(self.t.scheduler.get_last_lr()[0])
        self.window = {}
        t_eval = time.time()
        m = self.last_metrics = self.evaluate(done, figures)
        if self.run.is_main:
            runfolder.append_metrics(self.run.run_dir, m)
            bar.write(f"step {done}: mae {m['mae']:.3f} qwk {m['qwk']:.3f} "
                      f"spearman {m['spearman']:.3f} fpr {m['false_positive_rate']:.3f}")
            if self.run.accelerator.log_with:
                self.run.accelerator.log({f"eval/{k}": v for k, v in m.items()
                                          if isinstance(v, (int, float)) and math.isfinite(v)}, step=done)
        self.t.model.train()
        self.eval_seconds += time.time() - t_eval

    def evaluate(self, step: int, train_figures: dict) -> dict:
        """The EMA teacher on the test set (each process its share, gathered), and the figures."""
        acc = self.run.accelerator
        idx, probs = [], []
        dtype = mixed_precision_dtype(self.run.cfg.train.mixed_precision)
        for p, b in bracket_probs(self.t.ema.module, self.batches.test, acc.device, dtype,
                                  target=get_target(self.run.cfg.model.target)):
            probs.append(p.numpy())
            idx.append(self.test_rows[b["index"].numpy()])
        pairs = gather_object([(np.concatenate(idx), np.concatenate(probs))])
        all_idx = np.concatenate([p[0] for p in pairs])
        all_probs = self.last_probs = np.concatenate([p[1] for p in pairs])[np.argsort(all_idx)]
        seen = gather_object([sorted(self.progress.skipped)])
        top_k = default_top_k(len(self.test_scores), self.run.cfg.eval.top_k_fraction)
        m = {"step": step, **compute_metrics(all_probs, self.test_scores, top_k=top_k)}
        m["skipped_images"] = len(set().union(*map(set, seen)))
        m["num_processes"] = self.run.world
        m.update(train_figures)
        return m

    def save_checkpoint(self, done: int) -> None:
        """Every process writes its files into a temp folder; the main process publishes it
        once all are written (checkpoints.publish), so a kill leaves only whole checkpoints."""
        run, acc, t = self.run, self.run.accelerator, self.t
        t_save = time.time()
        tmp = ckpt.temp_dir_for(run.run_dir, done)
        acc.save_state(str(tmp))
        ckpt.write_rank_state(tmp, "algorithm", run.rank, t.algo_state.state_dict())
        ckpt.write_rank_state(tmp, "loop", run.rank, {"stream_batches": torch.tensor(self.progress.stream_batches)})
        if run.is_main:
            ckpt.write_extras(tmp, {"ema": t.ema.state_dict()},
                              {"step": done, "scheduler": t.scheduler.state_dict(), "skipped": self.progress.skipped,
                               "num_processes": run.world})
        acc.wait_for_everyone()  # every process's files are written before it counts as whole
        if run.is_main:
            ckpt.publish(run.run_dir, done, run.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()
        self.save_seconds += time.time() - t_save


# --------------------------------------------------------------------------- the end


FINAL_KEYS = ("mae", "qwk", "spearman", "accuracy", "accuracy_within_1", "false_positive_rate", "top_k_precision",
              "skipped_images")


def write_model(run: Run, trainer: Trainer, final_model: torch.nn.Module, info: dict) -> None:
    """model/ (the EMA teacher, the algorithm's export thresholds, the model card), timing.json,
    and the final metrics line."""
    if not run.is_main:
        return
    cfg, run_dir, algo = run.cfg, run.run_dir, trainer.t.algo
    steps = trainer.steps
    extra = {"algorithm": cfg.algorithm.name, "thresholds": algos.thresholds_for_export(algo),
             "confidence_radius": algos.confidence_radius(algo), "trained_steps": steps, "seed": cfg.seed}
    save_model_folder(final_model, info, run_dir / "model", extra, files=model_card_file(run_dir, trainer, info, extra))
    (run_dir / "timing.json").write_text(json.dumps({"steps": steps - trainer.progress.start_step,
                                                     "loop_seconds": round(trainer.loop_seconds, 3),
                                                     "eval_seconds": round(trainer.eval_seconds, 3)}))
    last = trainer.last_metrics or runfolder.read_metrics(run_dir)[-1]
    print(f"\nrun folder: {run_dir}  ({time.time() - trainer.t0:.0f}s, {run.world} process(es))")
    final = {k: round(v, 4) if isinstance(v, float) and math.isfinite(v) else runfolder.null_if_not_finite(v)
             for k, v in ((k, last[k]) for k in FINAL_KEYS)}
    print("final metrics: " + json.dumps(final, allow_nan=False))


def model_card_file(run_dir: Path, trainer: Trainer, info: dict, extra: dict) -> dict[str, str]:
    """{'README.md': the model card} (aessl/modelcard.py), from the run files and the last
    evaluation; {} with a warning if it cannot be written: a card must never cost the model."""
    try:
        test_hist = bracket_histogram(bracket_of(trainer.test_scores))
        pred_hist = bracket_histogram(trainer.last_probs.argmax(axis=1)) if trainer.last_probs is not None else None
        card = modelcard.card_for_run(run_dir, {**info, **extra}, trainer.last_metrics, test_hist, pred_hist)
    except Exception as exc:  # a bug in the card's text, an odd run.json: the weights still get written
        log.warning("model card not written (%s: %s); the model is", type(exc).__name__, exc)
        return {}
    return {modelcard.CARD_FILE: card}


# --------------------------------------------------------------------------- helpers


def broadcast_value(value, world: int):
    """The main process's `value` on every process."""
    if world > 1:
        box = [value]
        broadcast_object_list(box, from_process=0)
        value = box[0]
    return value


def user_message(exc: Exception) -> str:
    """The message of a user-facing error; one raised in a loader worker arrives wrapped in
    DataLoader's "Caught ... Original Traceback" text, and only its last line is the message."""
    text = str(exc)
    if isinstance(exc, DataSourceError) and "Original" in text:
        return text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text
