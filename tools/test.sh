#!/usr/bin/env bash
# The test suite on a fresh machine: environment, real sample data, lint, then pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/tools/bootstrap.sh" test train bench
cd "$root"
# Colin27 (held-out whole head) comes from Debian; tests that need it skip with a reason if absent.
if [[ ! -f /usr/share/mricron/templates/ch2.nii.gz && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mricron-data) >/dev/null 2>&1 \
    || echo "note: could not install mricron-data; Colin27 tests will be skipped"
fi
ruff check .
ruff format --check .
python -m pytest "$@"
