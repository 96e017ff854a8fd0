#!/usr/bin/env bash
# Data-parallel training launched with msrun, on CPU, GPU or Ascend, one or several nodes.
#
#   bash scripts/run_distributed.sh --worker_num 8 --local_worker_num 8 --device Ascend --config configs/ddpm_cifar10_ascend.yaml
#   bash scripts/run_distributed.sh --worker_num 2 --local_worker_num 2 --device CPU --config configs/unet_mnist5k_cpu.yaml -- --set train.steps=50 train.warmup_steps=10
#
# Arguments after "--" go to `ms-ddpm train` (e.g. --resume, --set key=value ...). Each rank's output goes to
# LOG_DIR/worker_<rank>.log, the scheduler's to LOG_DIR/scheduler.log and msrun's own messages to LOG_DIR/msrun.log.
# msrun binds each process to its share of the CPU cores (--bind_core=True; on Ascend, the cores near its NPU).
# When a rank fails, msrun stops the others. This script then exits with status 2 and the error when ms-ddpm
# refused the command or config, or else names the ranks that did not finish and says whether the run can resume.
# HCCL timeouts: see scripts/launch_common.sh. Run it with the virtual environment active: msrun starts `python`
# from PATH.
set -uo pipefail

usage() {
    cat <<USAGE
usage: bash scripts/run_distributed.sh --config FILE [options] [-- ms-ddpm train arguments]
  --config FILE            YAML config (required)
  --worker_num N           processes in the whole job (default 8)
  --local_worker_num N     processes on this node (default: worker_num)
  --master_addr ADDR       address of the node running the scheduler (default 127.0.0.1)
  --master_port PORT       scheduler port, 1024-65535, free on the master node (default 8118)
  --node_rank N            rank of this node, 0 on the master (default 0)
  --log_dir DIR            per-rank logs (default logs/distributed)
  --device CPU|GPU|Ascend  device of every process (default: the config's train.device)
  --cluster_time_out S     seconds to wait for all processes to join (default 300)
USAGE
}

source "$(dirname "$0")/launch_common.sh"

CONFIG="" WORKER_NUM=8 LOCAL_WORKER_NUM="" MASTER_ADDR=127.0.0.1 MASTER_PORT=8118 NODE_RANK=0
LOG_DIR=logs/distributed DEVICE="" TIME_OUT=300
while [[ $# -gt 0 ]]; do
    case "$1" in
        --config) CONFIG="${2-}"; shift 2 ;;
        --worker_num) WORKER_NUM="${2-}"; shift 2 ;;
        --local_worker_num) LOCAL_WORKER_NUM="${2-}"; shift 2 ;;
        --master_addr) MASTER_ADDR="${2-}"; shift 2 ;;
        --master_port) MASTER_PORT="${2-}"; shift 2 ;;
        --node_rank) NODE_RANK="${2-}"; shift 2 ;;
        --log_dir) LOG_DIR="${2-}"; shift 2 ;;
        --device) DEVICE="${2-}"; shift 2 ;;
        --cluster_time_out) TIME_OUT="${2-}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown argument '$1'" ;;
    esac
done
LOCAL_WORKER_NUM="${LOCAL_WORKER_NUM:-$WORKER_NUM}"

[[ -n "$CONFIG" ]] || die "--config is required"
[[ -f "$CONFIG" ]] || die "config file '$CONFIG' does not exist"
is_int "$WORKER_NUM" && (( WORKER_NUM >= 1 )) || die "--worker_num must be a positive integer, got '$WORKER_NUM'"
is_int "$LOCAL_WORKER_NUM" && (( LOCAL_WORKER_NUM >= 1 && LOCAL_WORKER_NUM <= WORKER_NUM )) \
    || die "--local_worker_num must be an integer from 1 to --worker_num ($WORKER_NUM), got '$LOCAL_WORKER_NUM'"
is_int "$NODE_RANK" && (( NODE_RANK * LOCAL_WORKER_NUM < WORKER_NUM )) \
    || die "--node_rank must be an integer with node_rank * local_worker_num < worker_num, got '$NODE_RANK'"
is_int "$MASTER_PORT" && (( MASTER_PORT >= 1024 && MASTER_PORT <= 65535 )) \
    || die "--master_port must be an integer from 1024 to 65535, got '$MASTER_PORT'"
is_int "$TIME_OUT" || die "--cluster_time_out must be a non-negative integer, got '$TIME_OUT'"
if [[ -n "$DEVICE" ]]; then
    [[ "$DEVICE" =~ ^(CPU|GPU|Ascend)$ ]] || die "--device must be one of CPU, GPU, Ascend, got '$DEVICE'"
    set -- "$@" --set "train.device=$DEVICE"
fi
command -v msrun >/dev/null || die "msrun not found: activate the virtual environment where MindSpore is installed"
if (( NODE_RANK == 0 )); then  # the scheduler binds MASTER_PORT on this node
    python - "$MASTER_ADDR" "$MASTER_PORT" <<'PY' || die "port $MASTER_PORT on $MASTER_ADDR is busy or the address is not local; choose another --master_port"
import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
PY
fi

mkdir -p "$LOG_DIR"
export GLOG_v="${GLOG_v:-2}"  # MindSpore's log level: warnings and errors (set GLOG_v=1 for its INFO lines)
first=$(( NODE_RANK * LOCAL_WORKER_NUM ))
echo "launching $LOCAL_WORKER_NUM of $WORKER_NUM workers (node $NODE_RANK, scheduler $MASTER_ADDR:$MASTER_PORT)"
for (( r = first; r < first + LOCAL_WORKER_NUM; r++ )); do echo "  rank $r log: $LOG_DIR/worker_$r.log"; done

# msrun's stderr holds its warnings and, when a worker fails, a traceback of its own that says nothing more
msrun --worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER_NUM" --master_addr="$MASTER_ADDR" \
    --master_port="$MASTER_PORT" --node_rank="$NODE_RANK" --log_dir="$LOG_DIR" --join=True \
    --cluster_time_out="$TIME_OUT" --bind_core=True "$(dirname "$0")/train.py" --config "$CONFIG" "$@" \
    2> "$LOG_DIR/msrun.log"
status=$?

if (( status != 0 )); then
    unfinished=() unfinished_logs=()
    for (( r = first; r < first + LOCAL_WORKER_NUM; r++ )); do
        log="$LOG_DIR/worker_$r.log"
        grep -q "^rank $r: finished" "$log" 2>/dev/null || { unfinished+=("$r"); unfinished_logs+=("$log"); }
    done
    errors=$(user_errors "${unfinished_logs[@]}")
    if [[ -n "$errors" ]]; then  # ranks without the line were stopped by msrun when the others failed
        report_user_errors "$errors"
        exit 2
    fi
    for r in "${unfinished[@]}"; do
        log="$LOG_DIR/worker_$r.log"
        [[ -f "$log" ]] || log="$LOG_DIR/msrun.log"  # the worker never started
        echo "$PROG: rank $r did not finish; last lines of $log:" >&2
        tail -n 5 "$log" 2>/dev/null | sed 's/^/    /' >&2
    done
    echo "$PROG: distributed job failed (msrun exit status $status)" >&2
    advise_resume --config "$CONFIG" "$@"
    exit "$status"
fi
echo "all $LOCAL_WORKER_NUM local workers finished; logs in $LOG_DIR"
