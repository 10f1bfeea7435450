# shellcheck shell=bash
# Shared launcher for scripts/slurm/*.sh (sourced, not run). The task scripts set their defaults and call
# po_launch "$@". One SLURM task per node runs torchrun with GPUS_PER_NODE processes; the nodes meet through a
# c10d rendezvous on the first node of the allocation, so `sbatch --nodes=N` scales without edits.
# Every setting below is an environment variable; anything after the script name goes to open_clip_po.main.

po_die() {
    echo "error: $*" >&2
    exit 1
}

po_require_int() {
    case "${!1}" in
        '' | *[!0-9]*) po_die "$1 must be a whole number, got '${!1}'" ;;
    esac
}

# The paper's per-objective defaults (ICLR 2025, Sec. 4): beta and lambda of Eq. 14. An explicit PO_BETA /
# PO_REG_LAMBDA always wins. The CE baseline has no beta and, by default, no regulariser.
po_objective_defaults() {
    case "$PO_LOSS" in
        dpo) : "${PO_BETA:=1}" "${PO_REG_LAMBDA:=1}" ;;
        ipo) : "${PO_BETA:=0.01}" "${PO_REG_LAMBDA:=0.01}" ;;
        kto) : "${PO_BETA:=1.5}" "${PO_REG_LAMBDA:=0.01}" ;;
        ce)
            [ -z "${PO_BETA:-}" ] || po_die "PO_LOSS=ce has no beta: unset PO_BETA"
            : "${PO_REG_LAMBDA:=0}"
            ;;
        *)
            if [ -z "${PO_BETA:-}" ] || [ -z "${PO_REG_LAMBDA:-}" ]; then
                po_die "PO_LOSS=$PO_LOSS has no paper defaults: set PO_BETA and PO_REG_LAMBDA"
            fi
            ;;
    esac
}

# Number of training samples: TRAIN_NUM_SAMPLES, or the sizes.json beside the shards (as open_clip reads it).
po_count_samples() {
    if [ -n "${TRAIN_NUM_SAMPLES:-}" ]; then
        echo "$TRAIN_NUM_SAMPLES"
        return
    fi
    "$PYTHON" - "$TRAIN_DATA" <<'PY'
import json, os, sys
from braceexpand import braceexpand

total = 0
for source in sys.argv[1].split("::"):
    shards = list(braceexpand(source))
    sizes_path = os.path.join(os.path.dirname(shards[0]), "sizes.json")
    if not os.path.exists(sizes_path):
        sys.exit(f"error: no {sizes_path}: set TRAIN_NUM_SAMPLES or WARMUP")
    with open(sizes_path) as f:
        sizes = json.load(f)
    missing = [os.path.basename(s) for s in shards if os.path.basename(s) not in sizes]
    if missing:
        sys.exit(f"error: {sizes_path} lacks {missing[:3]}: set TRAIN_NUM_SAMPLES or WARMUP")
    total += sum(int(sizes[os.path.basename(s)]) for s in shards)
print(total)
PY
}

# "DIR/PREFIX-{000000..000NNN}.tar" for the shards DIR holds (as the shard builders name them), or nothing.
po_shard_pattern() {
    "$PYTHON" - "$1" "$2" <<'PY'
import os, re, sys

folder, prefix = sys.argv[1:3]
found = re.compile(re.escape(prefix) + r"-(\d{6})\.tar$")
numbers = sorted(int(m.group(1)) for m in map(found.match, os.listdir(folder) if os.path.isdir(folder) else []) if m)
if numbers:
    if numbers != list(range(len(numbers))):
        sys.exit(f"error: {folder}/{prefix}-*.tar are not numbered 000000..{len(numbers) - 1:06d}; set the pattern")
    last = len(numbers) - 1
    print(os.path.join(folder, f"{prefix}-{{000000..{last:06d}}}.tar" if last else f"{prefix}-000000.tar"))
PY
}

po_launch() {
    : "${PYTHON:=python}"
    : "${DATA_DIR:=data}"
    : "${PO_LOSS:=dpo}"
    po_objective_defaults

    # Shards: TRAIN_DATA / REG_DATA (open_clip brace patterns), else every pref-/reg- shard in DATA_DIR.
    if [ -z "${TRAIN_DATA:-}" ]; then
        TRAIN_DATA=$(po_shard_pattern "$DATA_DIR" pref) || exit 1
        [ -n "$TRAIN_DATA" ] || po_die "no $DATA_DIR/pref-*.tar: set DATA_DIR or TRAIN_DATA"
    fi
    if [ -z "${REG_DATA+set}" ]; then
        # Unset = the reg- shards beside the preference shards; REG_DATA= (empty) turns the regulariser off.
        REG_DATA=$(po_shard_pattern "$DATA_DIR" reg) || exit 1
    fi
    : "${MODEL:=ViT-B-32}"
    : "${PRETRAINED=openai}"           # PRETRAINED= (empty): random init
    : "${LOGS:=logs}"
    : "${GPUS_PER_NODE:=8}"
    : "${GLOBAL_BATCH:=512}"
    : "${LR:=2e-5}"
    : "${EPOCHS:=3}"
    : "${OPT:=timm/adamax}"
    # open_clip hands eps=None to timm optimizers unless --eps is given (Adamax then fails): torch's default.
    : "${EPS:=1e-8}"
    # The paper names no weight decay; 0 is Adamax's own default (open_clip's 0.2 is for pre-training AdamW).
    : "${WD:=0}"
    : "${WARMUP_FRACTION:=0.1}"
    : "${SEED:=0}"
    : "${PO_AVERAGE:=}"                # none | bma | ema; empty = open_clip_po.main's default

    local nnodes="${SLURM_NNODES:-1}"
    local name_
    for name_ in GPUS_PER_NODE GLOBAL_BATCH EPOCHS SEED; do
        po_require_int "$name_"
    done
    local procs backend precision
    if [ "$GPUS_PER_NODE" -eq 0 ]; then
        # CPU: processes share the cores, gloo carries the collectives.
        procs="${NPROC_PER_NODE:-2}"
        backend=gloo
        precision="${PRECISION:-fp32}"
    else
        procs="${NPROC_PER_NODE:-$GPUS_PER_NODE}"
        backend=nccl
        precision="${PRECISION:-amp}"
    fi
    NPROC_PER_NODE=$procs
    po_require_int NPROC_PER_NODE
    local world=$((nnodes * procs))
    if [ -z "${BATCH_SIZE:-}" ]; then
        [ $((GLOBAL_BATCH % world)) -eq 0 ] ||
            po_die "GLOBAL_BATCH=$GLOBAL_BATCH is not divisible by $world processes; set BATCH_SIZE"
        BATCH_SIZE=$((GLOBAL_BATCH / world))
    fi
    po_require_int BATCH_SIZE
    local cpus="${SLURM_CPUS_PER_TASK:-$(nproc)}"
    local workers="${WORKERS:-$(((cpus / procs) > 1 ? (cpus / procs) - 1 : 1))}"

    # open_clip's --warmup counts optimizer steps: WARMUP_FRACTION of all steps unless WARMUP is given.
    local warmup="${WARMUP:-}"
    if [ -z "$warmup" ]; then
        local samples steps
        samples=$(po_count_samples) || exit 1
        steps=$(((samples / (BATCH_SIZE * world)) * EPOCHS))
        warmup=$("$PYTHON" -c "import math, sys; print(max(1, math.ceil(float(sys.argv[1]) * int(sys.argv[2]))))" \
            "$WARMUP_FRACTION" "$steps")
    fi

    local job_id="${SLURM_JOB_ID:-$$}"
    local name="${NAME:-${SLURM_JOB_NAME:-po}-${PO_LOSS}-${job_id}}"
    # shellcheck disable=SC2034  # read by the task scripts after po_launch (typographic.sh's benchmark)
    PO_RUN_DIR="$LOGS/$name"
    local master_addr master_port
    if [ -n "${MASTER_ADDR:-}" ]; then
        master_addr=$MASTER_ADDR
    elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then
        # sed reads to the end: `head -n1` could close the pipe early, and pipefail would turn SIGPIPE into exit 141.
        local first_node
        first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
        # The node's NodeAddr where SLURM has one (node names that are not host names, several slurmds on one
        # host); the name itself otherwise.
        master_addr=$(scontrol show node -o "$first_node" 2>/dev/null |
            sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p') || true
        master_addr=${master_addr:-$first_node}
    else
        master_addr=127.0.0.1
    fi
    # A port per job, so jobs sharing a node do not collide.
    master_port="${MASTER_PORT:-$((20000 + job_id % 20000))}"

    local -a train_args=(
        --po-loss "$PO_LOSS"
        --model "$MODEL"
        --train-data "$TRAIN_DATA"
        --logs-dir "$LOGS" --name "$name"
        --batch-size "$BATCH_SIZE" --lr "$LR" --epochs "$EPOCHS" --opt "$OPT" --eps "$EPS" --wd "$WD"
        --warmup "$warmup" --lr-scheduler cosine --seed "$SEED"
        --workers "$workers" --precision "$precision" --dist-backend "$backend"
        --save-frequency 1
    )
    if [ -n "${PO_BETA:-}" ]; then
        train_args+=(--po-beta "$PO_BETA")
    fi
    if [ -n "$PRETRAINED" ]; then
        train_args+=(--pretrained "$PRETRAINED")
    fi
    if [ -n "$REG_DATA" ]; then
        # lambda only with D_reg: without it there is no regulariser, and the trainer refuses an inert lambda
        train_args+=(--po-reg-data "$REG_DATA" --po-reg-lambda "$PO_REG_LAMBDA")
    fi
    if [ -n "$PO_AVERAGE" ]; then
        train_args+=(--po-average "$PO_AVERAGE")
    fi

    local -a launcher=(
        "$PYTHON" -m torch.distributed.run
        --nnodes "$nnodes" --nproc-per-node "$procs"
        --rdzv-backend c10d --rdzv-endpoint "$master_addr:$master_port" --rdzv-id "$job_id"
        -m open_clip_po.main
    )

    echo "open_clip_po: $PO_LOSS beta=${PO_BETA:-none} lambda=$PO_REG_LAMBDA on $nnodes node(s) x $procs process(es)," \
        "batch $BATCH_SIZE/process, warmup $warmup steps, run $LOGS/$name"
    mkdir -p "$LOGS"
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        # One task per node; a failure on any node ends the job instead of leaving the others waiting.
        srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${launcher[@]}" "${train_args[@]}" "$@"
    else
        "${launcher[@]}" "${train_args[@]}" "$@"
    fi
}
