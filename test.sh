#!/usr/bin/env bash
# Set up on first use (with the test extras), then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
EXTRAS=test source tools/setup_venv.sh
exec .venv/bin/python -m pytest "$@"
