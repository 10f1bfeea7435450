#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Flipping CLIP's gender understanding (paper Sec. 4.2): y_w = the caption with the gender flipped, y_l = the
# original; the regulariser sees the same images with androgynous captions ("The person is <activity>"). As in the
# paper only a linear head W is trained (LINEAR_HEAD=1, the towers stay frozen); scale it afterwards with
# python -m open_clip_po.svd_scale. beta = lambda = 1 for every objective (PO_LOSS=dpo|ipo|kto).
# HEAD_TOWERS=both is the paper's head (similarity x^T W^T W y); HEAD_TOWERS=image puts W on the image tower only,
# (W x)^T y, which can reverse gender where the paper's form can only erase it (README, the gender demo).
#   mkdir -p logs && DATA_DIR=data/gender sbatch scripts/slurm/gender.sh [extra open_clip_po.main flags]
#SBATCH --job-name=po-gender
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.out
set -euo pipefail

if [ -n "${PO_SCRIPTS_DIR:-}" ]; then
    here=$PO_SCRIPTS_DIR
elif [ -n "${SLURM_JOB_ID:-}" ]; then
    # sbatch runs a spooled copy of this file; the job's Command is the submitted path, then the arguments.
    here=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=//p')
    here=${here%%/gender.sh*}
else
    here=$(dirname "${BASH_SOURCE[0]}")
fi
if [ ! -f "$here/common.sh" ]; then
    echo "error: no common.sh in '$here' (the directory of gender.sh); set PO_SCRIPTS_DIR" >&2
    exit 1
fi
# shellcheck source=common.sh
. "$here/common.sh"

: "${PO_LOSS:=dpo}"
: "${PO_BETA:=1}"
: "${PO_REG_LAMBDA:=1}"
: "${DATA_DIR:=data/gender}"  # python -m open_clip_po.data.gender --out DATA_DIR ...
: "${LINEAR_HEAD:=1}"         # 1: train only a linear head W on the frozen towers (paper); 0: the whole model
: "${HEAD_TOWERS:=both}"      # both (paper) | image
case "$HEAD_TOWERS" in
    both | image) ;;
    *) echo "error: HEAD_TOWERS must be both or image, got '$HEAD_TOWERS'" >&2; exit 1 ;;
esac
if [ "$LINEAR_HEAD" = 1 ]; then
    set -- --po-linear-head --po-head-towers "$HEAD_TOWERS" "$@"
elif [ "$HEAD_TOWERS" != both ]; then
    echo "error: HEAD_TOWERS=$HEAD_TOWERS needs LINEAR_HEAD=1" >&2
    exit 1
fi
po_launch "$@"
