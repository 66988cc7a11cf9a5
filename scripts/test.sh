#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
# `--stack ngc-26.02` first: set up that stack's venv and run the tests marked `stack` there (the engine tests that
# matter for a job: online upcycle at step 0, training on one and two ranks, checkpoint save / resume, export, the
# recipe catalog dry run), in one pytest process.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "${1:-}" = --stack ]; then
  stack=${2:?--stack needs a name}
  shift 2
  py=$(bash "$here/scripts/setup.sh" --stack "$stack" | tail -n 1)
  cd "$here"
  exec "$py" -m pytest -q -m stack "$@"
fi
py=$(bash "$here/scripts/setup.sh" | tail -n 1)
cd "$here"
exec "$py" -m pytest -q "$@"
