#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Typographic-attack robustness (paper Sec. 4.1): PO on (attacked image, true-class caption, written-class caption)
# triplets with a KL regulariser on clean images. Objective: PO_LOSS=dpo|ipo|kto (paper defaults for beta, lambda).
#   mkdir -p logs && DATA_DIR=data/typographic sbatch scripts/slurm/typographic.sh [extra open_clip_po.main flags]
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
po_launch "$@"
