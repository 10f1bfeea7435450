#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# A hyper-parameter sweep as ONE SLURM job array: one element per run of GRID that is not done yet, at most
# ARRAY_PARALLEL at a time; each element is a normal po_launch (common.sh) on its allocation and ends with the run's
# evaluation (RUN/eval.json). Submit from the login node with bash (not sbatch); resubmitting skips finished runs
# and redoes broken ones. See docs/sweeps.md.
#   LOGS=sweeps/demo bash scripts/slurm/sweep.sh GRID.toml [extra open_clip_po.main flags for every run]
#   python -m open_clip_po.eval pareto sweeps/demo     # the report, when the array has finished
#SBATCH --job-name=po-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=12:00:00
set -euo pipefail

if [ -n "${PO_SCRIPTS_DIR:-}" ]; then
    here=$PO_SCRIPTS_DIR
else
    here=$(dirname "${BASH_SOURCE[0]}")
fi
if [ ! -f "$here/common.sh" ]; then
    echo "error: no common.sh in '$here' (the directory of sweep.sh); set PO_SCRIPTS_DIR" >&2
    exit 1
fi
# shellcheck source=common.sh
. "$here/common.sh"

: "${PYTHON:=python}"
[ $# -ge 1 ] || po_die "usage: bash sweep.sh GRID.toml [extra open_clip_po.main flags]"
grid=$1
shift

if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    # Submission: write the plan, then one array over the runs still to do.
    [ -z "${SLURM_JOB_ID:-}" ] || po_die "run sweep.sh with bash on the login node, not with sbatch: it submits the array itself"
    [ -f "$grid" ] || po_die "no grid file '$grid'"
    : "${LOGS:=logs/$(basename "$grid" .toml)}"
    : "${ARRAY_PARALLEL:=4}"
    po_require_int ARRAY_PARALLEL
    job_name=
    pending=
    plan=$("$PYTHON" -m open_clip_po.sweep.driver plan "$grid" --out "$LOGS") || exit 1
    eval "$plan"  # job_name (the grid's name), pending (indices of the runs not done, e.g. 0,2,3)
    if [ -z "$pending" ]; then
        echo "open_clip_po sweep: every run of $grid is done in $LOGS; report: $PYTHON -m open_clip_po.eval pareto $LOGS"
        exit 0
    fi
    logs=$(cd "$LOGS" && pwd)
    # More sbatch options (partition, time, resources) for every element, split on spaces.
    read -r -a sbatch_args <<< "${SBATCH_ARGS:-}"
    # The element finds this directory and the runs folder through the environment sbatch passes on.
    PO_SCRIPTS_DIR=$(cd "$here" && pwd) LOGS=$logs sbatch --parsable --array="$pending%$ARRAY_PARALLEL" \
        --job-name="$job_name" --output="$logs/slurm-%A_%a.out" --error="$logs/slurm-%A_%a.out" \
        "${sbatch_args[@]}" "$here/sweep.sh" "$grid" "$@"
    echo "open_clip_po sweep: runs $pending of $grid submitted as one array (at most $ARRAY_PARALLEL at a time) into $logs" >&2
    exit 0
fi

# An array element: run number SLURM_ARRAY_TASK_ID of the plan in LOGS.
[ -n "${LOGS:-}" ] || po_die "LOGS (the runs folder) is not set in the array element"
index=$SLURM_ARRAY_TASK_ID
log="$LOGS/slurm-${SLURM_ARRAY_JOB_ID}_${index}.out"
# po_launch's variables for this run (NAME, PO_LOSS, LR, ...) and its other flags (run_args); a broken earlier
# attempt of the run is moved aside first.
run_args=()
settings=$("$PYTHON" -m open_clip_po.sweep.driver element "$LOGS" --index "$index") || exit 1
eval "$settings"
status=0
(po_launch "${run_args[@]}" "$@") || status=$?
"$PYTHON" -m open_clip_po.sweep.driver finish "$LOGS" --index "$index" --train-status "$status" --log "$log"
