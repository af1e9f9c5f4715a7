#!/usr/bin/env bash
# Creates .venv (if missing) with the pinned torch first, then DeepMRI and the extras asked for
# ("$@", e.g. test train). Sourced by demo.sh and test.sh so a fresh machine needs nothing else.
# torch comes from pip's configured index unless DEEPMRI_TORCH_INDEX names a wheel index: PyTorch's
# CPU-only one on a machine without a GPU, or a CUDA one (see README, "Which PyTorch build").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DEEPMRI_VENV:-$root/.venv}"
torch_pin="torch==2.13.0"
torch_index="${DEEPMRI_TORCH_INDEX:-}"
extras=$(IFS=,; echo "$*")
stamp="$venv/.deepmri-installed-${extras:-core}"
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
if [[ ! -f "$stamp" || "$root/pyproject.toml" -nt "$stamp" ]]; then
  # torch first and pinned: an unpinned resolve would pull a newer build than the one tested.
  if [[ -n "$torch_index" ]]; then
    "$venv/bin/python" -m pip install --quiet --index-url "$torch_index" "$torch_pin"
  else
    "$venv/bin/python" -m pip install --quiet "$torch_pin"
  fi
  "$venv/bin/python" -m pip install --quiet -e "$root${extras:+[$extras]}"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
