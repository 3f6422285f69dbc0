"""Our own semi-supervised algorithms, one module each.

A module here defines a subclass of USB's `AlgorithmBase` and registers it under its name
with `@ALGORITHMS.register("name")` (semilearn.core.utils). Importing this package imports
every module in it, so a new algorithm is one new file: `algorithm.name=<name>` then finds
it (aessl/algorithms.py), and its `get_argument()` declares what `algorithm.args` takes.
docs/CONTRIBUTING.md walks through one.
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
