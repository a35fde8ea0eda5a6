#!/usr/bin/env bash
# The prepared device check: run once on a GPU machine, from anywhere.
#
#   bash benchmarks/gpu_check.sh                       # CUDA: install, 8192 PNG + 8192 JPEG tiles, ...
#   bash benchmarks/gpu_check.sh --device cpu --quick  # a CPU-only machine: a few hundred tiles
#
# Step 1 (here): create a venv and install the project in it (pip install -e '.[dev]').
# Steps 2-7 (benchmarks/gpu_check.py, in that venv): cohorts, bench_embed on the device in fp16 and
# bf16, device-vs-CPU feature agreement, 3 epochs of CLAM on the device and load_checkpoint, torchrun,
# and one compact report, printed and written to WORKDIR/gpu_check_report.txt (figures in .json).
# Exits non-zero when any step fails.
#
# Options of this script (the others go to gpu_check.py: --device, --quick, --backbone, --runtime,
# --precisions, --n_tiles, --bench_tiles):
#   --workdir DIR      where the venv, the tiles, the caches and the report go (default /tmp/gpu_check)
#   --report FILE      the report file (default WORKDIR/gpu_check_report.txt)
#   --reuse-packages   install the project into the new venv without downloading anything: the venv
#                      sees the packages of $PYTHON's environment (a .pth file), and pip installs the
#                      project alone (--no-deps). For CI and offline machines; the default downloads.
# Environment: PYTHON, the interpreter that creates the venv (default python3).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORKDIR=/tmp/gpu_check
REPORT=""
REUSE=0
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --workdir) WORKDIR="$2"; shift 2 ;;
        --report) REPORT="$2"; shift 2 ;;
        --reuse-packages) REUSE=1; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) PASS+=("$1"); shift ;;
    esac
done
mkdir -p "$WORKDIR"
WORKDIR="$(cd "$WORKDIR" && pwd)"
REPORT="${REPORT:-$WORKDIR/gpu_check_report.txt}"
VENV="$WORKDIR/venv"
LOG="$WORKDIR/install.log"

fail_install() {
    {
        echo "gpu_check: step 1 failed, nothing else ran"
        echo "[FAILED] 1 install: $1 (log: $LOG)"
        tail -n 15 "$LOG" | sed 's/^/      /'
        echo "RESULT: FAILED steps 1"
    } | tee "$REPORT"
    exit 1
}

# ---- step 1: a venv of its own, and the project installed in it
started=$(date +%s)
rm -rf "$VENV"
: > "$LOG"
if [ "$REUSE" = 1 ]; then
    # A venv made from a venv's python sees the *base* interpreter's packages, not that venv's (even
    # with --system-site-packages), so the parent environment's site-packages go in by a .pth file.
    "$PYTHON" -m venv --without-pip "$VENV" >>"$LOG" 2>&1 || fail_install "python -m venv failed"
    SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$PYTHON" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' \
        > "$SITE/gpu_check_parent.pth" || fail_install "could not read $PYTHON's site-packages"
    "$VENV/bin/python" -m pip install --no-deps --no-build-isolation --no-index -e "$ROOT" >>"$LOG" 2>&1 \
        || fail_install "pip install --no-deps -e . failed"
    how="venv seeing $("$PYTHON" -c 'import sys; print(sys.prefix)')'s packages, project installed --no-deps"
else
    "$PYTHON" -m venv "$VENV" >>"$LOG" 2>&1 || fail_install "python -m venv failed"
    "$VENV/bin/python" -m pip install --upgrade pip >>"$LOG" 2>&1 || fail_install "pip upgrade failed"
    "$VENV/bin/python" -m pip install -e "$ROOT[dev]" >>"$LOG" 2>&1 || fail_install "pip install -e '.[dev]' failed"
    how="pip install -e '.[dev]'"
fi
# The project must come from this checkout, not from wherever the parent environment points.
where="$(cd "$WORKDIR" && env -u PYTHONPATH "$VENV/bin/python" -c 'import feature_extraction, clam, os; print(os.path.dirname(os.path.dirname(feature_extraction.__file__)))')" \
    || fail_install "the venv cannot import the project"
[ "$where" = "$ROOT" ] || fail_install "the venv imports the project from $where, not $ROOT"
install="$how into $VENV in $(( $(date +%s) - started )) s"
echo "step 1 install: ok ($install)"

# ---- steps 2-7
cd "$ROOT" || exit 1
env -u PYTHONPATH "$VENV/bin/python" "$ROOT/benchmarks/gpu_check.py" --workdir "$WORKDIR" --report "$REPORT" \
    --install "$install" "${PASS[@]}"
