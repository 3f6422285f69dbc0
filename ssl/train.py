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
from datetime import datetime
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
    from aessl.data import (DrawBatchSampler, DrawDataset, EvalDataset, StreamingPool, bracket_histogram, collate,
                            load_pool, load_scored_set, pool_length, stratified_split, worker_init)
    from aessl.metrics import NUM_BRACKETS, compute_metrics, default_top_k
    from aessl.models import WeightsUnavailable, build_model, save_model_folder
    from aessl.sources import resolve_sources
    from aessl.transforms import eval_transform, train_transforms

    tcfg, dcfg = cfg.train, cfg.data
    # The run folder is chosen before the Accelerator exists (trackers need it): the main
    # process picks it and every process writes to that one.
    out = [cfg.output_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}"]
    # (PartialState does not read ACCELERATE_USE_CPU by itself; AcceleratorState would.)
    if PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).num_processes > 1:
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

    # ---------------------------------------------------------------- run folder
    resume_from = ckpt.latest_checkpoint(run_dir) if cfg.resume else None
    if not cfg.resume and (run_dir / "metrics.jsonl").exists():
        if accelerator.is_main_process:
            print(f"error: {run_dir} already holds a run; resume it with resume=true or choose another output_dir=",
                  file=sys.stderr)
        return 2

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
            else:
                is_test = stratified_split(scored["bracket"], float(dcfg.test_fraction), int(cfg.seed))
            train_set, test_set = scored.select(np.flatnonzero(~is_test)), scored.select(np.flatnonzero(is_test))
        pool = None
        if src["unlabeled"] and cfg.algorithm.name != "supervised":
            pool = load_pool(src["unlabeled"], streaming=bool(dcfg.streaming), limit=dcfg.max_unlabeled)
    except (LabeledSetError, DataSourceError) as exc:
        if accelerator.is_main_process:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(test_set) == 0:
        print("error: the test split is empty; give data.test= or a larger labeled set", file=sys.stderr)
        return 2
    pool_size = None if pool is None else pool_length(pool)  # None: a stream of unknown length

    # ---------------------------------------------------------------- embedding mode: cached features
    # The frozen backbone's features of every image (eval view, K weak, K strong) come from the
    # cache; what is missing is computed now (ssl/embed.py does the same pass on its own).
    embedding, feats = cfg.model.mode == "embedding", None
    if embedding:
        from aessl import embedding as emb

        try:
            feats = emb.prepare_features(cfg, accelerator, {"train": train_set, "test": test_set, "pool": pool},
                                         int(dcfg.num_workers))
        except (emb.EmbeddingError, WeightsUnavailable) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        lost = feats["skipped"]["train"] + feats["skipped"]["test"]
        if lost:  # scored images were validated as readable; losing one silently would shift the split
            print("error: scored images missing from the embedding cache:\n" + "\n".join(f"  - {n}: {r}" for n, r in lost),
                  file=sys.stderr)
            return 2
        if pool is not None:
            pool_size = len(feats["tables"]["pool"])

    # ---------------------------------------------------------------- model, EMA, optimiser, algorithm
    try:
        if embedding:  # the trained module is the head alone; model/ gets the backbone back at the end
            head = emb.head_spec(cfg.model, feats["stats"]["dim"])
            model = emb.build_head(head)
            info = {**feats["info"], "mode": "embedding", "head": head, "num_classes": NUM_BRACKETS}
        else:
            model, info = build_model(cfg.model, int(dcfg.image_size), float(dcfg.crop_pct))
    except WeightsUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ema = timm.utils.ModelEmaV3(model, decay=float(tcfg.ema_decay), use_warmup=True)
    if tcfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=float(tcfg.lr), momentum=float(tcfg.momentum),
                                    nesterov=True, weight_decay=float(tcfg.weight_decay))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=float(tcfg.lr), weight_decay=float(tcfg.weight_decay))
    steps = int(tcfg.steps)
    # Not prepared by Accelerate (it would step once per process); stepped once per update.
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(tcfg.warmup_steps), steps)
    lb_hist = np.asarray(bracket_histogram(train_set["bracket"]), dtype=np.float64)
    try:
        algo = algos.build_algorithm(
            cfg.algorithm.name, model, user_args=dict(cfg.algorithm.args), num_train_iter=steps,
            lambda_u=float(cfg.algorithm.lambda_u), ulb_dest_len=int(pool_size or 1), lb_dest_len=len(train_set),
            lb_prior=(lb_hist + 1) / (lb_hist + 1).sum(), rank=rank, world_size=world,
        )
    except algos.AlgorithmArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uses_pool = bool({"x_ulb_w", "x_ulb_s"} & set(algos.step_inputs(algo, {"x_ulb_w": 0, "x_ulb_s": 0})))
    if uses_pool and pool is None:
        print(f"error: algorithm {cfg.algorithm.name!r} needs an unlabeled pool: set data.unlabeled=", file=sys.stderr)
        return 2
    model, optimizer = accelerator.prepare(model, optimizer)
    algo.model = model
    algo_state = algos.AlgorithmState(algo)

    # ---------------------------------------------------------------- resume
    start_step, skipped_seen = 0, dict(feats["skipped"].get("pool", [])) if embedding else {}
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_temp(run_dir)
    if resume_from is not None:
        tensors, progress = ckpt.read_extras(resume_from, ["ema", "algorithm"])
        ema.load_state_dict(tensors["ema"])
        algo_state.load_state_dict(tensors["algorithm"])
        scheduler.load_state_dict(progress["scheduler"])
        start_step, skipped_seen = int(progress["step"]), dict(progress["skipped"])
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
            "embedding": feats["stats"] if embedding else None,
        }, indent=1))
        # A resumed run forgets evaluations made after its checkpoint: they will be redone.
        mfile = run_dir / "metrics.jsonl"
        if mfile.exists():
            kept = [l for l in mfile.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= start_step]
            mfile.write_text("".join(l + "\n" for l in kept))
    if accelerator.log_with:
        accelerator.init_trackers("aessl",
                                  config={k: v for k, v in _flat(to_dict(cfg)).items() if isinstance(v, (int, float, str, bool))})

    # ---------------------------------------------------------------- loaders
    bsz, workers = int(tcfg.batch_size), int(dcfg.num_workers)
    start_micro = start_step * int(tcfg.grad_accum)

    def loader(dataset, batch_size, stream_start=None):
        kw = dict(num_workers=workers, collate_fn=collate, worker_init_fn=worker_init,
                  pin_memory=accelerator.device.type == "cuda", persistent_workers=workers > 0)
        if workers > 0:
            kw["prefetch_factor"] = 4
        if stream_start is None:  # iterable (streaming) dataset
            return DataLoader(dataset, batch_size=batch_size, **kw)
        return DataLoader(dataset, batch_sampler=DrawBatchSampler(batch_size, rank, world, stream_start), **kw)

    def feature_loader(dataset, batch_size, start=None):  # embedding mode: whole batches gathered in-process
        if start is None:  # the test set, in order
            return DataLoader(dataset, batch_size=batch_size, collate_fn=emb.identity_collate)
        return DataLoader(dataset, batch_sampler=DrawBatchSampler(batch_size, rank, world, start),
                          collate_fn=emb.identity_collate)

    ulb_iter, ubsz = None, bsz * int(tcfg.uratio)
    test_rows = np.arange(rank, len(test_set), world)  # each process scores its own share
    if embedding:
        K, tables = int(cfg.embed.views), feats["tables"]
        lb_iter = iter(feature_loader(emb.FeatureDraws(tables["train"], "labeled", K, scores=train_set["score"],
                                                       seed=int(cfg.seed), stream=0), bsz, start_micro))
        if uses_pool:
            ulb_iter = iter(feature_loader(emb.FeatureDraws(tables["pool"], "unlabeled", K, seed=int(cfg.seed), stream=1),
                                           ubsz, start_micro))
        test_loader = feature_loader(emb.FeatureEval(tables["test"], test_rows), int(cfg.eval.batch_size))
    else:
        weak, strong = train_transforms(info, cfg.augment)
        lb_iter = iter(loader(DrawDataset(train_set, "labeled", weak, seed=int(cfg.seed), stream=0), bsz, start_micro))
        if uses_pool and hasattr(pool, "__len__"):
            ulb_iter = iter(loader(DrawDataset(pool, "unlabeled", weak, strong, seed=int(cfg.seed), stream=1), ubsz, start_micro))
        elif uses_pool:
            stream = StreamingPool(pool, weak, strong, int(cfg.seed), rank, world, pool_size or 1_000_000,
                                   skip=start_micro * ubsz)
            ulb_iter = iter(loader(stream, ubsz))
        test_loader = DataLoader(EvalDataset(test_set.select(test_rows), eval_transform(info), int(dcfg.image_size)),
                                 batch_size=int(cfg.eval.batch_size), num_workers=min(workers, 2))
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
    for step in range(start_step, steps):
        for _ in range(int(tcfg.grad_accum)):
            batch = next(lb_iter)
            note_skipped(batch.pop("skipped"))
            if ulb_iter is not None:
                ub = next(ulb_iter)
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
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(last_metrics, allow_nan=True) + "\n")
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
            if accelerator.is_main_process:
                ckpt.write_extras(tmp, {"ema": ema.state_dict(), "algorithm": algo_state.state_dict()},
                                  {"step": done, "scheduler": scheduler.state_dict(), "skipped": skipped_seen,
                                   "num_processes": world})
                ckpt.publish(run_dir, done, int(tcfg.keep_checkpoints))
            accelerator.wait_for_everyone()
            save_seconds += time.time() - t_save
        if done == kill_at_step:  # fault injection for the resume tests: die like a SIGKILL would
            os._exit(137)
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
            last_metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        keys = ("mae", "qwk", "spearman", "accuracy", "accuracy_within_1", "false_positive_rate", "top_k_precision", "skipped_images")
        print(f"\nrun folder: {run_dir}  ({time.time() - t0:.0f}s, {world} process(es))")
        print("final metrics: " + json.dumps({k: round(last_metrics[k], 4) if isinstance(last_metrics[k], float) else last_metrics[k] for k in keys}))
    accelerator.end_training()
    return 0


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


if __name__ == "__main__":
    sys.exit(main())
