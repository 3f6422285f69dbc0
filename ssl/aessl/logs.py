"""One log format for every entry script: time, level, message; the main process logs at
INFO, the others only warnings (one line per event, not one per process). A no-op when the
root logger is already configured (a caller's own setup, or pytest's)."""

from __future__ import annotations

import logging


def setup_logging(is_main: bool = True) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
