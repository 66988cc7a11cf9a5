#!/usr/bin/env bash
# Set up everything on a fresh machine (Python 3.11, CPU): a virtualenv with the pinned NeMo 2 stack,
# the CPU torch 2.13.0 on disk, the offline data packages, and this project (editable).
# Idempotent: the venv is reused while requirements/ and setup.cfg are unchanged (a stamp holds their hash).
# Prints the venv's python path as its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${NEMO_UPCYCLE_VENV:-$HOME/.cache/nemo-upcycle/venv}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
stamp_want=$(cat "$here"/requirements/*.txt "$here"/setup.cfg | sha256sum | cut -c1-16)
stamp_file="$venv/.nemo-upcycle-stamp"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp_want" ]; then
  echo "[setup] installing the pinned stack into $venv (about 3 minutes on a fresh machine)" >&2
  "$py" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
  # torch first, from the file on disk: anything that pulls torch before this would fetch a CUDA build.
  "${pip[@]}" torch==2.13.0
  "${pip[@]}" -c "$here/requirements/constraints.txt" -r "$here/requirements/base.txt"
  "${pip[@]}" --no-deps -r "$here/requirements/nodeps.txt"
  echo "$stamp_want" > "$stamp_file"
fi
# The project itself: editable and without deps, so every checkout (CI clones anew) gets its own entry point.
"$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e "$here" >&2
echo "$venv/bin/python"
