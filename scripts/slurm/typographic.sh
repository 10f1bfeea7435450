#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Typographic-attack robustness (paper Sec. 4.1): PO on (attacked image, true-class caption, written-class caption)
# triplets with a KL regulariser on clean images. Objective: PO_LOSS=dpo|ipo|kto (paper defaults for beta, lambda).
#   mkdir -p logs && DATA_DIR=data/typographic sbatch scripts/slurm/typographic.sh [extra open_clip_po.main flags]
# The paper's recipe end to end: IMAGENET_TRAIN=<ImageNet train split> builds the ImageNet-100 triplets into DATA_DIR
# first (if it holds none), BENCHMARK_ROOT=<data sets> evaluates the trained model after training (eval benchmark
# --typographic) and writes Table 1 to <run folder>/benchmark/.
# More nodes: sbatch --nodes=4 scripts/slurm/typographic.sh (the global batch stays 512). See docs/slurm.md.
#SBATCH --job-name=po-typographic
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.out
set -euo pipefail

if [ -n "${PO_SCRIPTS_DIR:-}" ]; then
    here=$PO_SCRIPTS_DIR
elif [ -n "${SLURM_JOB_ID:-}" ]; then
    # sbatch runs a spooled copy of this file; the job's Command is the submitted path, then the arguments.
    here=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=//p')
    here=${here%%/typographic.sh*}
else
    here=$(dirname "${BASH_SOURCE[0]}")
fi
if [ ! -f "$here/common.sh" ]; then
    echo "error: no common.sh in '$here' (the directory of typographic.sh); set PO_SCRIPTS_DIR" >&2
    exit 1
fi
# shellcheck source=common.sh
. "$here/common.sh"

: "${PO_LOSS:=dpo}"
: "${DATA_DIR:=data/typographic}"  # python -m open_clip_po.data.typographic --out DATA_DIR ...
: "${PYTHON:=python}"
: "${PO_AVERAGE:=bma}"             # the paper reports BMA weights (App. H); PO_AVERAGE=none for the raw ones only
: "${IMAGENET_TRAIN:=}"            # ImageNet train split (<WordNet id>/<image>): build the triplets from it
: "${IMAGENET100_DIR:=$(dirname "$DATA_DIR")/imagenet100-train}"  # the 100 class folders (links) for the builder
: "${TRIPLET_TEMPLATE:=an image of a {\}.}" # y_w / y_l captions, the paper's Sec. 4.1 wording
# Samples per triplet shard: training needs a shard per reader (nodes x processes x workers); ImageNet-100's
# 126,689 training images make 127 shards, enough for 16 GPUs with 7 workers each.
: "${TRIPLET_SHARD_SIZE:=1000}"
: "${BENCHMARK_ROOT:=}"            # data sets for eval benchmark (CLIP_benchmark layout); empty: no evaluation
: "${BENCHMARK_DATASETS:=table1}"
: "${BENCHMARK_TEMPLATES:=defense-prefix}" # the paper's evaluation templates; clip_benchmark for CLIP_benchmark's
: "${PAINT_FT:=}"                  # a fine-tuned (e.g. CE) checkpoint: adds PAINT rows between PRETRAINED and it
: "${PAINT_ALPHA:=0.5}"

# Settings of the steps after training are checked before it: a missing data set must not wait for the end.
if [ -n "$BENCHMARK_ROOT" ]; then
    if [ -n "$PAINT_FT" ] && [ -z "${PRETRAINED-openai}" ]; then
        po_die "PAINT_FT needs PRETRAINED, the zero-shot end of the interpolation"
    fi
    "$PYTHON" -m open_clip_po.eval benchmark --check-data --model "${MODEL:-ViT-B-32}" \
        --datasets "$BENCHMARK_DATASETS" --dataset-root "$BENCHMARK_ROOT" || exit 1
fi

# 1. ImageNet-100 → typographic triplets (on the batch host, before training reads their sizes.json).
if [ -n "$IMAGENET_TRAIN" ] && [ -z "$(po_shard_pattern "$DATA_DIR" pref)" ]; then
    echo "open_clip_po: building ImageNet-100 triplets from $IMAGENET_TRAIN into $DATA_DIR"
    "$PYTHON" -m open_clip_po.data.imagenet100 --imagenet "$IMAGENET_TRAIN" --out "$IMAGENET100_DIR"
    "$PYTHON" -m open_clip_po.data.typographic --images "$IMAGENET100_DIR" \
        --classnames "$IMAGENET100_DIR/classnames.txt" --template "$TRIPLET_TEMPLATE" --out "$DATA_DIR" \
        --max-count "$TRIPLET_SHARD_SIZE" --workers "${SLURM_CPUS_PER_TASK:-$(nproc)}"
fi

# 2. Training (common.sh).
po_launch "$@"

# 3. Table 1 of this run: the pre-trained model and the trained one (last epoch), on one node.
if [ -n "$BENCHMARK_ROOT" ]; then
    checkpoint=$(find "$PO_RUN_DIR/checkpoints" -name 'epoch_[0-9]*.pt' | sort -V | tail -n 1)
    [ -n "$checkpoint" ] || po_die "no checkpoint in $PO_RUN_DIR/checkpoints to evaluate"
    weights=raw
    case "$PO_AVERAGE" in bma | ema) weights=$PO_AVERAGE ;; esac
    rows=("$checkpoint")
    labels=(--label "$PO_LOSS")
    row_weights=("$weights")
    if [ -n "$PRETRAINED" ]; then
        rows=("$PRETRAINED" "$checkpoint")
        labels=(--label "pre-trained" --label "$PO_LOSS")
        row_weights=(raw "$weights")
    fi
    device=cuda
    extra=(--amp)
    if [ "$GPUS_PER_NODE" -eq 0 ]; then
        device=cpu
        extra=()
    fi
    if [ -n "$PAINT_FT" ]; then
        extra+=(--interpolate "$PRETRAINED" "$PAINT_FT" --alpha "$PAINT_ALPHA")
    fi
    benchmark=(
        "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC_PER_NODE"
        -m open_clip_po.eval benchmark --model "$MODEL" --pretrained "${rows[@]}" "${labels[@]}"
        --weights "${row_weights[@]}" --datasets "$BENCHMARK_DATASETS" --dataset-root "$BENCHMARK_ROOT" --typographic
        --templates "$BENCHMARK_TEMPLATES"
        --device "$device" --workers "${WORKERS:-2}" --output "$PO_RUN_DIR/benchmark" ${extra[@]+"${extra[@]}"}
    )
    echo "open_clip_po: benchmark of $checkpoint ($weights weights) → $PO_RUN_DIR/benchmark"
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 "${benchmark[@]}"
    else
        "${benchmark[@]}"
    fi
fi
