#!/usr/bin/env bash
# Set up on first use, then train. With no arguments and an empty labeled/, trains the
# built-in synthetic demo (configs/demo.yaml). Extra arguments are dotted overrides
# (train.steps=500 algorithm.name=freematch ...) or --config FILE.
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_venv.sh
export PATH="$PWD/.venv/bin:$PATH"
config=configs/demo.yaml
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --config) config="$2"; shift 2 ;;
        --config=*) config="${1#--config=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
exec accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    ssl/train.py --config "$config" "${args[@]}"
