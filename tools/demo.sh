#!/usr/bin/env bash
# First run: segments a real sample MRI with a bundled model and writes NIfTI + PNG preview.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/tools/bootstrap.sh" data
cd "$root"
deepmri demo --output "${1:-$root/output/demo}"
