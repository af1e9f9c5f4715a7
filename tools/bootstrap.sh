#!/usr/bin/env bash
# Creates .venv (if missing) with the pinned CPU torch first, then DeepMRI and the extras asked
# for ("$@", e.g. test train). Sourced by demo.sh and test.sh so a fresh machine needs nothing else.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DEEPMRI_VENV:-$root/.venv}"
torch_pin="torch==2.13.0"
extras=$(IFS=,; echo "$*")
stamp="$venv/.deepmri-installed-${extras:-core}"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
if [[ ! -f "$stamp" || "$root/pyproject.toml" -nt "$stamp" ]]; then
  # torch first and pinned: an unpinned resolve would pull several GB of CUDA packages.
  "$venv/bin/python" -m pip install --quiet "$torch_pin"
  "$venv/bin/python" -m pip install --quiet -e "$root${extras:+[$extras]}"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
