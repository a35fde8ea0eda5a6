#!/usr/bin/env bash
# The guards that keep the code's shape: ruff (lint and format check, configured in pyproject.toml)
# and import-linter's layer contracts (`lint-imports`, also in pyproject.toml). Sets up .venv if needed.
# `bash scripts/lint.sh --fix` applies ruff's fixes and formatting instead of only checking.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"

if [ "${1:-}" = "--fix" ]; then
    "$VENV/bin/ruff" check --fix .
    "$VENV/bin/ruff" format .
fi
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/lint-imports"
