#!/usr/bin/env bash
# Create .venv on first use and (re)install the project whenever pyproject.toml changes.
# Sourced by train.sh and test.sh; EXTRAS selects optional dependencies (e.g. "test").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
extras="${EXTRAS:-}"
stamp_src="$(cat "$root/pyproject.toml"; echo "extras=$extras")"
stamp="$venv/.installed-$(printf '%s' "$stamp_src" | sha256sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating $venv" >&2
    "$py" -m venv "$venv"
fi
if [ ! -f "$stamp" ]; then
    echo "[setup] installing dependencies into $venv (the first time downloads a few GB)" >&2
    "$venv/bin/python" -m pip install -q --upgrade pip
    target="$root"
    [ -n "$extras" ] && target="$root[$extras]"
    "$venv/bin/python" -m pip install -q -e "$target"
    touch "$stamp"  # one stamp per (pyproject, extras): train.sh and test.sh don't undo each other
fi
