#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite, slow end-to-end tests included.
# Extra arguments go to pytest (e.g. -x, -k name). "No tests collected" counts as a failure.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"

status=0
"$PY" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
