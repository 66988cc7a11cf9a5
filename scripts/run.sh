#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on its embedded default (python train.py).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=$(bash "$here/scripts/setup.sh" | tail -n 1)
cd "$here"
exec "$py" train.py "$@"
