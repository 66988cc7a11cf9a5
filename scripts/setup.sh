#!/usr/bin/env bash
# Set up everything on a fresh machine (Python 3.11, CPU): a virtualenv with the pinned NeMo 2 stack,
# the CPU torch 2.13.0 on disk, the offline data packages, and this project (editable).
# Stacks: the default (requirements/*.txt: nemo-toolkit 2.7.3 + megatron-core 0.15.3) in $NEMO_UPCYCLE_VENV
# (~/.cache/nemo-upcycle/venv); `--stack ngc-26.02` (requirements/ngc-26.02/: what nvcr.io/nvidia/nemo:26.02 ships,
# nemo-toolkit 2.7.0 + megatron-core 0.16.0) in its own venv, the same path + "-ngc-26.02".
# Idempotent: the venv is reused while its requirements and setup.cfg are unchanged (a stamp holds their hash).
# Prints the venv's python path as its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
stack=default
if [ "${1:-}" = --stack ]; then stack=${2:?--stack needs a name}; shift 2; fi
venv=${NEMO_UPCYCLE_VENV:-$HOME/.cache/nemo-upcycle/venv}
req=$here/requirements
if [ "$stack" != default ]; then
  if [ ! -f "$req/$stack/base.txt" ]; then
    echo "error: unknown stack '$stack'; use one of: default $(cd "$req" && ls -d -- */ | tr -d / | xargs)" >&2
    exit 2
  fi
  req=$req/$stack venv=$venv-$stack
fi
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
stamp_files=("$req"/*.txt "$here"/setup.cfg)
[ "$stack" = default ] || stamp_files+=("$here"/requirements/nodeps.txt)  # shared by every stack
stamp_want=$(cat "${stamp_files[@]}" | sha256sum | cut -c1-16)
stamp_file="$venv/.nemo-upcycle-stamp"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp_want" ]; then
  echo "[setup] installing the $stack stack into $venv (about 3 minutes on a fresh machine)" >&2
  "$py" -m venv "$venv"
  pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
  # torch first, from the file on disk: anything that pulls torch before this would fetch a CUDA build.
  "${pip[@]}" torch==2.13.0
  "${pip[@]}" -c "$req/constraints.txt" -r "$req/base.txt"
  "${pip[@]}" --no-deps -r "$here/requirements/nodeps.txt"
  echo "$stamp_want" > "$stamp_file"
fi
# The project itself: editable and without deps, so every checkout (CI clones anew) gets its own entry point.
"$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e "$here" >&2
echo "$venv/bin/python"
