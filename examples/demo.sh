#!/usr/bin/env bash
# streamcnn demo -- the training application end to end on the CPU:
#   streamcnn synth     a small synthetic CAMELYON-like set of slides
#   streamcnn train     a streamed ResNet-18 for a few epochs (curves, ROC, checkpoints)
#   streamcnn evaluate  the best checkpoint on the validation slides (AUC, predictions.csv)
#   streamcnn export    the model as TorchScript (runs with only libstreamcnn loaded)
#
#   bash examples/demo.sh [DIR]        (default DIR: build/demo; make demo)
#
# STREAMCNN names the command (default: streamcnn on PATH). A second run
# reuses the slides in DIR/data and trains a new run (--overwrite).
set -euo pipefail

STREAMCNN=${STREAMCNN:-streamcnn}
DIR=${1:-build/demo}
SLIDES=${SLIDES:-24}       # slides (3/4 train, 1/4 validation)
SIZE=${SIZE:-512}          # slide edge, level-0 pixels at 0.5 um/px
IMAGE=${IMAGE:-384}        # training image edge: the tissue at 0.5 um/px (full resolution)
EPOCHS=${EPOCHS:-6}

mkdir -p "$DIR"
t0=$(date +%s)
if [ ! -f "$DIR/data/train.csv" ]; then
  # a clearer signal than synth's defaults (4 clusters of 80 um, 2-pixel
  # texture 12 grey levels), so that a few CPU epochs learn it
  "$STREAMCNN" synth "$DIR/data" --slides "$SLIDES" --size "$SIZE" --seed 0 --clusters 4 \
    --tumour-size 80 --coarse 12
fi
"$STREAMCNN" train --train "$DIR/data/train.csv" --val "$DIR/data/val.csv" --out "$DIR/run" \
  --overwrite --image-size "$IMAGE" --mpp 0.5 --model resnet18 --stream-upto layer1 \
  --tile-size 160 --head max --epochs "$EPOCHS" --batch-size 4 --optimizer sgd --lr 0.01 \
  --schedule cosine --augment --device cpu
evaluation=$("$STREAMCNN" evaluate "$DIR/run/best.pt" --csv "$DIR/data/val.csv" \
  --out "$DIR/eval" --quiet)
echo "$evaluation"
"$STREAMCNN" export "$DIR/run/best.pt" "$DIR/model.pt"
t1=$(date +%s)

auc=$(echo "$evaluation" | awk '$1 == "AUC" { print $2 }')
echo
echo "demo done in $((t1 - t0)) s: validation AUC of best.pt ${auc:-?} (every epoch: $DIR/run/metrics.csv)"
echo "plots: $DIR/run/curves.png $DIR/run/roc.png"
echo "TorchScript: $DIR/model.pt (C++: examples/cpp_infer)"
