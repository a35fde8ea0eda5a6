#!/usr/bin/env bash
# The whole pipeline on the built-in example cohort, from a fresh clone:
#   1. set up .venv (first run only),
#   2. build the example cohort into train/ and test/ when both are empty
#      (a cohort already there, yours or an earlier example, is used as it is),
#   3. embed both splits into the feature cache (features/),
#   4. train CLAM (clam/checkpoints/run_<timestamp>/),
#   5. evaluate the best model on the test split, with attention maps, into one page: report.html.
# Backbone weights: ImageNet when they are in the torch hub cache or can be downloaded, else
# randomly initialised (said plainly below). CLAM_WEIGHTS=imagenet|random|/path/to/weights.pth
# forces a choice.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$ROOT"
started=$SECONDS

stage() { echo; echo "==> [$((SECONDS - started)) s] $*"; }

stage "example cohort"
cohort_state="$("$PY" - <<'PYTHON'
from pathlib import Path
from feature_extraction.example_cohort import split_dir_is_empty
empty = [split_dir_is_empty(Path(split)) for split in ("train", "test")]
print("empty" if all(empty) else "full" if not any(empty) else "half")
PYTHON
)"
case "$cohort_state" in
    empty) "$PY" -m feature_extraction.example_cohort --out "$ROOT" ;;
    full) echo "train/ and test/ already hold a cohort: using it (empty both folders to rebuild the example)" ;;
    *)
        echo "error: one of train/ and test/ is empty and the other is not. Empty both to build the" \
             "example cohort, or fill both with your own slides (layout: README.md)." >&2
        exit 1 ;;
esac

stage "backbone weights"
if [ -n "${CLAM_WEIGHTS:-}" ]; then
    WEIGHTS="$CLAM_WEIGHTS"
    echo "using --weights $WEIGHTS (from CLAM_WEIGHTS)"
else
    weights_status=0
    weights_error="$("$PY" -c "
import sys
from feature_extraction.backbones import load_backbone
from feature_extraction.errors import PipelineError
try:
    load_backbone('resnet50_trunc', 'imagenet')
except PipelineError as error:
    print(error)
    sys.exit(3)")" || weights_status=$?
    case "$weights_status" in
        0) WEIGHTS=imagenet; echo "using the ImageNet weights of ResNet-50 (torchvision IMAGENET1K_V1)" ;;
        3) WEIGHTS=random; echo "$weights_error" | sed 's/^/  /' ;;
        *) echo "error: could not load the backbone (see above)" >&2; exit 1 ;;
    esac
fi
if [ "$WEIGHTS" = random ] && [ -z "${CLAM_WEIGHTS:-}" ]; then
    cat <<'NOTICE'

  ************************************************************************************
  *  ImageNet weights are unavailable: the backbone is RANDOMLY INITIALISED.         *
  *  The pipeline runs end to end, but its features are not those of a pretrained   *
  *  network and its numbers say nothing about real slides. To use ImageNet weights, *
  *  place resnet50-0676ba61.pth in the torch hub cache as shown above (or run once  *
  *  with internet access), then run this script again.                              *
  ************************************************************************************
NOTICE
fi

stage "embed the train split"
"$PY" -m feature_extraction.embed --split train --weights "$WEIGHTS"
stage "embed the test split"
"$PY" -m feature_extraction.embed --split test --weights "$WEIGHTS"

stage "train CLAM"
"$PY" -m clam.train --weights "$WEIGHTS"

stage "evaluate on the test split"
"$PY" -m clam.evaluate

run_dir="$(ls -td "$ROOT"/clam/checkpoints/run_*/ | head -n 1)"
eval_dir="$(ls -td "$run_dir"eval_*/ 2>/dev/null | head -n 1 || true)"
stage "done"
echo "feature cache:   $ROOT/features/"
echo "training run:    ${run_dir%/}  (config.json, best_model.pt, checkpoint_epoch_N.pt, training.html)"
echo "evaluation:      ${eval_dir%/}  (metrics, predictions, ROC, attention maps)"
if [ "$WEIGHTS" = random ]; then
    echo "reminder: the backbone was randomly initialised (no ImageNet weights were available)"
fi
if [ -z "$eval_dir" ] || [ ! -f "${eval_dir}report.html" ]; then
    echo "error: the evaluation wrote no report.html (${eval_dir:-no eval_* folder in $run_dir})" >&2
    exit 1
fi
echo "report, one page with all of it (open it in a browser):"
echo "${eval_dir}report.html"
