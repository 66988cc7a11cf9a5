#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=$(bash "$here/scripts/setup.sh" | tail -n 1)
cd "$here"
exec "$py" -m pytest -q "$@"
