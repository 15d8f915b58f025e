#!/bin/sh
# Until the training issue lands: the model parity demo (our RWKV-6 against the rwkv runtime).
set -e
cd "$(dirname "$0")/.."
exec python scripts/parity_demo.py "$@"
