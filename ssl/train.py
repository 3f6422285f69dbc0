"""Semi-supervised training of a bracket scorer: accelerate launch ssl/train.py --config FILE [key=value ...]

main reads top to bottom: config -> run folder -> data -> mode (image or embedding) ->
model, EMA, optimiser, algorithm -> resume -> run files -> loaders -> loop (train step,
EMA, evaluate, checkpoint) -> final model/ folder. The steps live in aessl/loop.py and
aessl/modes.py.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from aessl.config import load_cli_config

    cfg = load_cli_config(argv, __doc__, "demo.yaml", "train.steps=200 algorithm.name=freematch")
    if cfg is None:
        return 2
    from aessl import loop
    from aessl.modes import training_mode

    run = loop.start_run(cfg)
    try:
        resume_from = loop.find_resume(run)
        data = loop.load_data(run, resume_from)
        mode = training_mode(cfg)
        mode.prepare(run, data)
        model, info = mode.build_module(data)
        training = loop.build_training(run, data, model)
        progress = loop.resume(run, training, resume_from, mode.skipped_pool_images())
        loop.write_run_files(run, data, training, mode.cache_stats(), resume_from, progress.start_step)
        rows = loop.test_rows(run, data)
        batches = mode.loaders(run, data, progress, training, rows)
        trainer = loop.Trainer(run, training, batches, progress, data, rows)
        loop.announce(run, data)
        trainer.restore(resume_from)
        trainer.train()
        loop.write_model(run, trainer, mode.final_model(training.ema.module), info)
    except loop.USER_ERRORS as exc:
        return run.refuse(exc)
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
