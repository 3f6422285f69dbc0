"""Fault injection for the resume tests, in one place: a process dies like a SIGKILL would
(exit 137, no cleanup, no flushing) when a count reaches the value of an environment variable.

    AESSL_KILL_AT_STEP=N             train.py, after step N's evaluation and checkpoint
    AESSL_KILL_AFTER_SHARDS=N        the embedding cache pass, after writing its N-th chunk
    AESSL_EXPORT_KILL_AFTER_SHARDS=N export, once this process has written N shards

Unset or 0: never. Production code calls `kill_point` and nothing else of this module.
"""

from __future__ import annotations

import os

KILL_AT_STEP = "AESSL_KILL_AT_STEP"
KILL_AFTER_CACHE_CHUNKS = "AESSL_KILL_AFTER_SHARDS"
KILL_AFTER_EXPORT_SHARDS = "AESSL_EXPORT_KILL_AFTER_SHARDS"


def kill_point(variable: str, count: int, at_least: bool = False) -> None:
    """Exit 137 at once when `count` equals (or, with at_least, has reached) $variable."""
    target = int(os.environ.get(variable) or 0)
    if target and (count >= target if at_least else count == target):
        os._exit(137)
