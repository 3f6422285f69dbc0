"""Semi-supervised training of a bracket scorer: accelerate launch ssl/train.py --config FILE [key=value ...]

Reads top to bottom: config -> data -> model -> algorithm -> prepare -> resume -> loop
(train step, EMA, evaluate, checkpoint) -> final model/ folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200 algorithm.name=freematch")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from aessl.config import ConfigError, load_config, save_config, to_dict
    from aessl.data import DataSourceError, LabeledSetError

    here = Path(__file__).resolve().parent
    try:
        cfg = load_config(args.config or here.parent / "configs" / "demo.yaml", args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import torch
    import timm.utils
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration, parse_flag_from_env
    from accelerate.utils import broadcast_object_list, gather_object, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from aessl import algorithms as algos
    from aessl import checkpoints as ckpt
    from aessl import pseudo as pseudo_labels
    from aessl import runfolder
    from aessl.data import (DrawBatchSampler, DrawDataset, EvalDataset, StreamingPool, bracket_histogram, collate,
                            load_pool, load_scored_set, pool_length, split_by_image, worker_init)
    from aessl.locks import FolderLock, FolderLocked
    from aessl.overlap import check_leakage
    from aessl.runfolder import new_run_name
    from aessl.metrics import NUM_BRACKETS, compute_metrics, default_top_k
    from aessl.models import WeightsUnavailable, build_model, save_model_folder
    from aessl.sources import resolve_sources
    from aessl.transforms import eval_transform, train_transforms

    tcfg, dcfg = cfg.train, cfg.data
    # The run folder is chosen before the Accelerator exists (trackers need it): the main
    # process picks it and every process writes to that one.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # (it does not read the variable itself)
    out = [cfg.output_dir or (new_run_name() if state.is_main_process else None)]
    if state.num_processes > 1:
        broadcast_object_list(out, from_process=0)
    run_dir = Path(out[0])
    accelerator = Accelerator(
        mixed_precision=tcfg.mixed_precision,
        gradient_accumulation_steps=int(tcfg.grad_accum),
        log_with=None if tcfg.tracker in (None, "none") else tcfg.tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("train")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(int(cfg.seed))

    run_lock, run_dir_existed = None, run_dir.exists() and any(p.name != ".lock" for p in run_dir.iterdir())

    def fail(msg: str) -> int:
        """Exit 2 with one clear message; a run folder this run created and left empty goes."""
        if accelerator.is_main_process:
            print(f"error: {msg}", file=sys.stderr)
            if run_lock is not None:
                run_lock.release()
            if not run_dir_existed and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".lock"}:
                (run_dir / ".lock").unlink(missing_ok=True)
                run_dir.rmdir()
        return 2

    # ---------------------------------------------------------------- run folder
    try:  # one live writer per run folder: a second run into it is refused, not interleaved
        run_lock = FolderLock.acquire_for(run_dir, "run folder", accelerator.is_main_process,
                                          broadcast_object_list if world > 1 else None)
    except FolderLocked as exc:
        run_dir_existed = True  # someone else's folder: leave it be
        return fail(str(exc))
    resume_from = ckpt.latest_checkpoint(run_dir) if cfg.resume else None
    if not cfg.resume and (run_dir / "metrics.jsonl").exists():
        return fail(f"{run_dir} already holds a run; resume it with resume=true or choose another output_dir=")
    if resume_from is not None:
        refusal = resume_refusal(run_dir, resume_from, cfg, world)
        if refusal:
            return fail(refusal)

    # ---------------------------------------------------------------- data
    try:
        src = resolve_sources(dcfg, accelerator.is_main_process, accelerator.wait_for_everyone)
        scored = load_scored_set(src["labeled"])
        if src["test"]:
            train_set, test_set = scored, load_scored_set(src["test"])
        else:
            split_file = run_dir / "split.csv"
            if resume_from is not None and split_file.exists():
                import pandas as pd

                test_paths = set(pd.read_csv(split_file).query("split == 'test'")["path"])
                is_test = np.array([p in test_paths for p in scored["path"]])
            else:  # by image (raters' rows stay together), seeded by the data's own key, not the run's
                is_test = split_by_image(scored["path"], scored["score"], float(dcfg.test_fraction),
                                         int(dcfg.split_seed))
            train_set, test_set = scored.select(np.flatnonzero(~is_test)), scored.select(np.flatnonzero(is_test))
        pool = None
        if src["unlabeled"] and cfg.algorithm.name != "supervised":
            pool = load_pool(src["unlabeled"], streaming=bool(dcfg.streaming), limit=dcfg.max_unlabeled)
            if hasattr(pool, "__len__"):
                probe_pool(pool)
    except (LabeledSetError, DataSourceError) as exc:
        return fail(str(exc))
    if len(test_set) == 0:
        return fail("the test split is empty; give data.test= or a larger labeled set")
    pool_size = None if pool is None else pool_length(pool)  # None: a stream of unknown length
    leakage = None
    if accelerator.is_main_process:
        leakage = check_leakage(test_set["path"], train_set["path"], pool)
    leakage = broadcast_value(leakage, world)
    refusal = report_leakage(leakage, log, allow=bool(dcfg.allow_test_overlap))
    if refusal:
        return fail(refusal)
    # An export's rows join the labels with soft targets (data.pseudo_labels; aessl/pseudo.py).
    pseudo, pseudo_info = None, None
    if dcfg.pseudo_labels:
        pseudo, pseudo_info, refusal = pseudo_labels.prepare(cfg, train_set, test_set, run_dir if resume_from is not None else None,
                                                             accelerator.is_main_process, lambda v: broadcast_value(v, world))
        if refusal:
            return fail(refusal)

    # ---------------------------------------------------------------- embedding mode: cached features
    # The frozen backbone's features of every image (eval view, K weak, K strong) come from the
    # cache; what is missing is computed now (ssl/embed.py does the same pass on its own).
    embedding, feats = cfg.model.mode == "embedding", None
    if embedding:
        from aessl import embedding as emb

        try:
            feats = emb.prepare_features(cfg, accelerator, {"train": train_set, "test": test_set, "pool": pool,
                                                            **({"pseudo": pseudo.table} if pseudo is not None else {})},
                                         int(dcfg.num_workers))
        except (emb.EmbeddingError, WeightsUnavailable, FolderLocked) as exc:
            return fail(str(exc))
        lost = feats["skipped"]["train"] + feats["skipped"]["test"]
        if lost:  # scored images were validated as readable; losing one silently would shift the split
            return fail("scored images missing from the embedding cache:\n" + "\n".join(f"  - {n}: {r}" for n, r in lost))
        if pool is not None:
            pool_size = len(feats["tables"]["pool"])
        lb_features = (feats["tables"]["train"], train_set["score"], None)  # (table, scores, soft targets)
        if pseudo is not None:
            lb_features = pseudo.feature_stream(feats, train_set["score"])

    # ---------------------------------------------------------------- model, EMA, optimiser, algorithm
    try:
        if embedding:  # the trained module is the head alone; model/ gets the backbone back at the end
            head = emb.head_spec(cfg.model, feats["stats"]["dim"])
            model = emb.build_head(head)
            info = {**feats["info"], "mode": "embedding", "head": head, "num_classes": NUM_BRACKETS}
        else:
            model, info = build_model(cfg.model, int(dcfg.image_size), float(dcfg.crop_pct))
    except WeightsUnavailable as exc:
        return fail(str(exc))
    if tcfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=float(tcfg.lr), momentum=float(tcfg.momentum),
                                    nesterov=True, weight_decay=float(tcfg.weight_decay))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=float(tcfg.lr), weight_decay=float(tcfg.weight_decay))
    steps = int(tcfg.steps)
    # Not prepared by Accelerate (it would step once per process); stepped once per update.
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(tcfg.warmup_steps), steps)
    lb_hist = np.asarray(bracket_histogram(train_set["bracket"]), dtype=np.float64)
    # The model is on its device (and wrapped for DDP) before anything copies it: the EMA
    # teacher, USB's EMA (meanteacher) and the algorithm's hooks must live where it lives.
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = timm.utils.ModelEmaV3(accelerator.unwrap_model(model), decay=float(tcfg.ema_decay), use_warmup=True)
    index_size = int(pool_size or dcfg.stream_index_size)  # per-image slots (FlexMatch); see StreamingPool
    try:
        algo = algos.build_algorithm(
            cfg.algorithm.name, model, user_args=dict(cfg.algorithm.args), num_train_iter=steps,
            lambda_u=float(cfg.algorithm.lambda_u), ulb_dest_len=index_size, lb_dest_len=len(train_set),
            lb_prior=(lb_hist + 1) / (lb_hist + 1).sum(), rank=rank, world_size=world,
        )
    except algos.AlgorithmArgumentError as exc:
        return fail(str(exc))
    uses_pool = bool({"x_ulb_w", "x_ulb_s"} & set(algos.step_inputs(algo, {"x_ulb_w": 0, "x_ulb_s": 0})))
    if uses_pool and pool is None:
        return fail(f"algorithm {cfg.algorithm.name!r} needs an unlabeled pool: set data.unlabeled=")
    algo_state = algos.AlgorithmState(algo)

    # ---------------------------------------------------------------- resume
    start_step, skipped_seen = 0, dict(feats["skipped"].get("pool", [])) if embedding else {}
    stream_batches = None  # unlabeled batches taken from a streamed pool (they can outnumber steps)
    if accelerator.is_main_process:
        ckpt.clean_temp(run_dir)
    if resume_from is not None:
        tensors, progress = ckpt.read_extras(resume_from, ["ema"])
        ema.load_state_dict(tensors["ema"])
        algo_state.load_state_dict(ckpt.read_rank_state(resume_from, "algorithm", rank))
        scheduler.load_state_dict(progress["scheduler"])
        start_step, skipped_seen = int(progress["step"]), dict(progress["skipped"])
        if (resume_from / ckpt.rank_file("loop", rank)).is_file():
            stream_batches = int(ckpt.read_rank_state(resume_from, "loop", rank)["stream_batches"])
        log.info("resumed from %s at step %d", resume_from, start_step)
    elif cfg.resume:
        log.info("resume=true but %s has no checkpoint yet: starting from step 0", run_dir)

    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
        if not src["test"]:
            import pandas as pd

            pd.DataFrame({"path": scored["path"], "score": scored["score"],
                          "split": np.where(is_test, "test", "train")}).to_csv(run_dir / "split.csv", index=False)
        (run_dir / "run.json").write_text(json.dumps({
            "num_processes": world, "mixed_precision": tcfg.mixed_precision, "device": str(accelerator.device),
            "sources": src, "train_images": len(train_set), "test_images": len(test_set), "pool_images": pool_size,
            "train_histogram": lb_hist.astype(int).tolist(), "algorithm": cfg.algorithm.name,
            "resumed_from": str(resume_from) if resume_from else None,
            "embedding": feats["stats"] if embedding else None, "leakage": leakage,
            "split_seed": None if src["test"] else int(dcfg.split_seed), "pseudo_labels": pseudo_info,
        }, indent=1))
        runfolder.keep_metrics_up_to(run_dir, start_step)  # later evaluations will be redone
    if accelerator.log_with:
        accelerator.init_trackers("aessl",
                                  config={k: v for k, v in runfolder.flat(to_dict(cfg)).items() if isinstance(v, (int, float, str, bool))})

    # ---------------------------------------------------------------- loaders
    bsz, workers = int(tcfg.batch_size), int(dcfg.num_workers)
    start_micro = start_step * int(tcfg.grad_accum)
    stream_batches = start_micro if stream_batches is None else stream_batches

    def loader(dataset, batch_size, stream_start=None):
        kw = dict(num_workers=workers, collate_fn=collate, worker_init_fn=worker_init,
                  pin_memory=accelerator.device.type == "cuda", persistent_workers=workers > 0)
        if workers > 0:
            kw["prefetch_factor"] = 4
        if stream_start is None:  # iterable (streaming) dataset
            return DataLoader(dataset, batch_size=batch_size, **kw)
        return DataLoader(dataset, batch_sampler=DrawBatchSampler(batch_size, rank, world, stream_start), **kw)

    def feature_loader(dataset, batch_size, start=None):  # embedding mode: whole batches gathered in-process
        kw = dict(collate_fn=emb.identity_collate, pin_memory=accelerator.device.type == "cuda")
        if start is None:  # the test set, in order
            return DataLoader(dataset, batch_size=batch_size, **kw)
        return DataLoader(dataset, batch_sampler=DrawBatchSampler(batch_size, rank, world, start), **kw)

    ulb_iter, ubsz = None, bsz * int(tcfg.uratio)
    test_rows = np.arange(rank, len(test_set), world)  # each process scores its own share
    if embedding:
        K, tables = int(cfg.embed.views), feats["tables"]
        lb_iter = iter(feature_loader(emb.FeatureDraws(lb_features[0], "labeled", K, scores=lb_features[1],
                                                       targets=lb_features[2], seed=int(cfg.seed), stream=0),
                                      bsz, start_micro))
        if uses_pool:
            ulb_iter = iter(feature_loader(emb.FeatureDraws(tables["pool"], "unlabeled", K, seed=int(cfg.seed), stream=1,
                                                            strong_view=str(cfg.embed.strong_view),
                                                            strong_noise=float(cfg.embed.strong_noise)),
                                           ubsz, start_micro))
        test_loader = feature_loader(emb.FeatureEval(tables["test"], test_rows), int(cfg.eval.batch_size))
    else:
        weak, strong = train_transforms(info, cfg.augment)
        lb_table, lb_targets = (train_set, None) if pseudo is None else pseudo.image_stream(train_set)
        lb_iter = iter(loader(DrawDataset(lb_table, "labeled", weak, seed=int(cfg.seed), stream=0, targets=lb_targets),
                              bsz, start_micro))
        if uses_pool and hasattr(pool, "__len__"):
            ulb_iter = iter(loader(DrawDataset(pool, "unlabeled", weak, strong, seed=int(cfg.seed), stream=1), ubsz, start_micro))
        elif uses_pool:
            stream = StreamingPool(pool, weak, strong, int(cfg.seed), rank, world, index_size, batch_size=ubsz,
                                   start_batch=stream_batches)
            ulb_iter = iter(loader(stream, ubsz))
        # Its own generator: a loader with workers draws a base seed each time it is iterated,
        # and from the global generator that would make dropout depend on the eval cadence.
        test_loader = DataLoader(EvalDataset(test_set.select(test_rows), eval_transform(info), int(dcfg.image_size)),
                                 batch_size=int(cfg.eval.batch_size), num_workers=min(workers, 2),
                                 generator=torch.Generator().manual_seed(0))
    test_scores = np.asarray(test_set["score"], dtype=np.float64)

    def note_skipped(items):
        for name, reason in items:
            if name not in skipped_seen:
                skipped_seen[name] = reason
                log.warning("skipping unreadable image %s: %s", name, reason)

    def evaluate(step: int, train_figures: dict) -> dict:
        net = ema.module
        net.eval()
        idx, probs = [], []
        with torch.no_grad():
            for b in test_loader:
                with accelerator.autocast():
                    logits = net(b["x"].to(accelerator.device))["logits"]
                probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
                idx.append(test_rows[b["index"].numpy()])
        pairs = gather_object([(np.concatenate(idx), np.concatenate(probs))])
        all_idx = np.concatenate([p[0] for p in pairs])
        all_probs = np.concatenate([p[1] for p in pairs])[np.argsort(all_idx)]
        seen = gather_object([sorted(skipped_seen)])
        m = {"step": step, **compute_metrics(all_probs, test_scores,
                                             top_k=default_top_k(len(test_scores), float(cfg.eval.top_k_fraction)))}
        m["skipped_images"] = len(set().union(*map(set, seen)))
        m["num_processes"] = world
        m.update(train_figures)
        return m

    # ---------------------------------------------------------------- loop
    if accelerator.is_main_process:
        log.info("run folder %s | %d train / %d test scored images, pool %s | %d process(es) on %s | %s on %s",
                 run_dir, len(train_set), len(test_set), pool_size, world, accelerator.device,
                 cfg.algorithm.name, cfg.model.name)
    if resume_from is not None:
        # Last, after the loaders exist: it restores the random generators too, and building
        # the loaders draws from them (a worker base seed), which an uninterrupted run did before
        # its checkpoint was taken. Dropout and random algorithms then continue identically.
        accelerator.load_state(str(resume_from))
    model.train()
    bar = tqdm(total=steps, initial=start_step, disable=not accelerator.is_main_process, desc="train", dynamic_ncols=True)
    window: dict[str, list] = {}
    last_metrics, t0 = None, time.time()
    eval_seconds = save_seconds = 0.0  # kept apart from the loop's own time (timing.json, benchmarks)
    kill_at_step = int(os.environ.get("AESSL_KILL_AT_STEP", "0"))
    try:
        for step in range(start_step, steps):
            for _ in range(int(tcfg.grad_accum)):
                batch = next(lb_iter)
                note_skipped(batch.pop("skipped"))
                if ulb_iter is not None:
                    ub = next(ulb_iter)
                    stream_batches += 1
                    while "x_ulb_w" not in ub:  # a streamed batch of unreadable images only: take the next
                        note_skipped(ub.pop("skipped"))
                        ub = next(ulb_iter)
                        stream_batches += 1
                    note_skipped(ub.pop("skipped"))
                    batch.update(ub)
                batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                with accelerator.accumulate(model):
                    out, log_dict = algo.train_step(**algos.step_inputs(algo, batch))
                    loss = out["loss"]
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower train.lr or check the data")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and float(tcfg.clip_grad) > 0:
                        accelerator.clip_grad_norm_(model.parameters(), float(tcfg.clip_grad))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            ema.update(accelerator.unwrap_model(model), step=step + 1)
            algos.after_optimizer_step(algo)
            for k, v in algos.log_figures(algo, log_dict).items():
                window.setdefault(k, []).append(v)
            bar.update(1)
            done = step + 1
            if done % int(tcfg.log_every) == 0 or done == steps:
                figures = {k: float(np.mean(v)) for k, v in window.items()}
                bar.set_postfix({k: f"{v:.3g}" for k, v in figures.items() if k in ("total_loss", "sup_loss", "pseudo_label_rate")})
                if accelerator.log_with:
                    accelerator.log({f"train/{k}": v for k, v in figures.items()} | {"train/lr": scheduler.get_last_lr()[0]}, step=done)
            if done % int(tcfg.eval_every) == 0 or done == steps:
                figures = {k: float(np.mean(v)) for k, v in window.items()}
                figures["lr"] = float(scheduler.get_last_lr()[0])
                window = {}
                t_eval = time.time()
                last_metrics = evaluate(done, figures)
                if accelerator.is_main_process:
                    runfolder.append_metrics(run_dir, last_metrics)
                    bar.write(f"step {done}: mae {last_metrics['mae']:.3f} qwk {last_metrics['qwk']:.3f} "
                              f"spearman {last_metrics['spearman']:.3f} fpr {last_metrics['false_positive_rate']:.3f}")
                    if accelerator.log_with:
                        accelerator.log({f"eval/{k}": v for k, v in last_metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}, step=done)
                model.train()
                eval_seconds += time.time() - t_eval
            if done % int(tcfg.save_every) == 0 or done == steps:
                t_save = time.time()
                tmp = ckpt.temp_dir_for(run_dir, done)
                accelerator.save_state(str(tmp))
                ckpt.write_rank_state(tmp, "algorithm", rank, algo_state.state_dict())
                ckpt.write_rank_state(tmp, "loop", rank, {"stream_batches": torch.tensor(stream_batches)})
                if accelerator.is_main_process:
                    ckpt.write_extras(tmp, {"ema": ema.state_dict()},
                                      {"step": done, "scheduler": scheduler.state_dict(), "skipped": skipped_seen,
                                       "num_processes": world})
                accelerator.wait_for_everyone()  # every process's files are written before it counts as whole
                if accelerator.is_main_process:
                    ckpt.publish(run_dir, done, int(tcfg.keep_checkpoints))
                accelerator.wait_for_everyone()
                save_seconds += time.time() - t_save
            if done == kill_at_step:  # fault injection for the resume tests: die like a SIGKILL would
                os._exit(137)
    except DataSourceError as exc:  # raised in a loader worker: the pool turned out unreadable
        bar.close()
        return fail(str(exc).strip().splitlines()[-1].split(": ", 1)[-1] if "Original" in str(exc) else str(exc))
    bar.close()
    loop_seconds = time.time() - t0 - eval_seconds - save_seconds

    # ---------------------------------------------------------------- final model
    if accelerator.is_main_process:
        extra = {"algorithm": cfg.algorithm.name, "thresholds": algos.thresholds_for_export(algo),
                 "confidence_radius": int(getattr(algo, "conf_radius", 0)),
                 "trained_steps": steps, "seed": int(cfg.seed)}
        final = emb.EmbeddingScoreModel(feats["backbone"], ema.module) if embedding else ema.module
        save_model_folder(final, info, run_dir / "model", extra)
        (run_dir / "timing.json").write_text(json.dumps({"steps": steps - start_step, "loop_seconds": round(loop_seconds, 3),
                                                         "eval_seconds": round(eval_seconds, 3)}))
        if last_metrics is None:
            last_metrics = runfolder.read_metrics(run_dir)[-1]
        keys = ("mae", "qwk", "spearman", "accuracy", "accuracy_within_1", "false_positive_rate", "top_k_precision", "skipped_images")
        print(f"\nrun folder: {run_dir}  ({time.time() - t0:.0f}s, {world} process(es))")
        print("final metrics: " + json.dumps({k: round(last_metrics[k], 4) if isinstance(last_metrics[k], float) else last_metrics[k] for k in keys}))
    accelerator.end_training()
    if run_lock is not None:
        run_lock.release()
    return 0


def resume_refusal(run_dir: Path, checkpoint: Path, cfg, world: int) -> str | None:
    """Why this run cannot resume `checkpoint` with this config, or None. Only settings that
    do not change what is learned may differ (runfolder.RESUME_HARMLESS)."""
    import yaml

    from aessl.config import DEFAULTS, to_dict
    from aessl.runfolder import resume_changes

    stored_file = run_dir / "config.yaml"
    stored = (yaml.safe_load(stored_file.read_text()) or {}) if stored_file.is_file() else None
    if stored is not None:
        changed = resume_changes(stored, to_dict(cfg), DEFAULTS)
        if changed:
            return (f"{run_dir} was trained with other settings; a resumed run must keep them (or start a new "
                    "output_dir=). Changed: " + "; ".join(changed))
        stored_workers = stored.get("data", {}).get("num_workers")
        if cfg.data.streaming and stored_workers is not None and int(stored_workers) != int(cfg.data.num_workers):
            return (f"{run_dir} streams its pool with data.num_workers={stored_workers}; each worker reads its own "
                    "part of the stream, so resume with the same number")
    saved_world = json.loads((checkpoint / "progress.json").read_text()).get("num_processes", world)
    if int(saved_world) != world:
        return (f"{checkpoint} was written by {saved_world} process(es) and this run has {world}: each process "
                "draws its own slice of every batch, so resume with the same number of processes")
    return None


def probe_pool(pool, tries: int = 32) -> None:
    """Fail before training when a pool is entirely unreadable: decode up to `tries` rows spread
    over it and raise DataSourceError if none decodes (a few bad files are skipped later)."""
    from aessl.data import DataSourceError, row_name, row_source, unreadable_run_message
    from aessl.images import UnreadableImage, load_image

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


def broadcast_value(value, world: int):
    """The main process's `value` on every process."""
    if world > 1:
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        value = box[0]
    return value


def report_leakage(leakage: dict, log, allow: bool) -> str | None:
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


if __name__ == "__main__":
    sys.exit(main())
