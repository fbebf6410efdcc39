#!/usr/bin/env bash
# One entry point for a fresh clone: installs into .venv on first use, then runs a job.
#   bash dev.sh quickstart   # the main job on the built-in default
#   bash dev.sh test         # the test suite (what CI runs)
#   bash dev.sh shell CMD..  # run any command inside the environment, e.g. `bash dev.sh shell smallscale --help`
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "installing into .venv (first run only) ..." >&2
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  # Pin the CPU build explicitly: a bare `torch` requirement would pull a multi-GB CUDA build.
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[dev]"
  touch .venv/.installed
fi
export PATH="$PWD/.venv/bin:$PATH"
job=${1:-}
shift || true
case "$job" in
  quickstart) exec smallscale quickstart "$@" ;;
  test) exec python -m pytest -q "$@" ;;
  shell) exec "$@" ;;
  *) echo "usage: bash dev.sh {quickstart|test|shell CMD...}" >&2; exit 64 ;;
esac
