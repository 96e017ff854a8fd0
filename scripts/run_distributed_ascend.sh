#!/usr/bin/env bash
# Classic Ascend launcher: one process per NPU, addressed through a rank-table (HCCL) JSON file.
#
#   bash scripts/run_distributed_ascend.sh --rank_table hccl_8p.json --config configs/ddpm_cifar10_ascend.yaml
#   bash scripts/run_distributed_ascend.sh --rank_table hccl_16p.json --device_num 8 --rank_start 8 --config ...   # node 2 of 2
#
# Each process gets DEVICE_ID (the card on this node), RANK_ID (its rank in the job) and RANK_SIZE, and writes
# LOG_DIR/rank_<RANK_ID>.log. Arguments after "--" go to `ms-ddpm train`. The script waits for all processes and
# exits non-zero, naming the ranks, if any fails. Run it with the virtual environment active.
set -uo pipefail

usage() {
    cat <<USAGE
usage: bash scripts/run_distributed_ascend.sh --rank_table FILE --config FILE [options] [-- ms-ddpm train arguments]
  --rank_table FILE   HCCL rank table (JSON) describing every card of the job (required)
  --config FILE       YAML config (required)
  --device_num N      processes (cards) on this node (default 8)
  --rank_start N      rank of this node's first card: 0 on the first node, 8 on the second, ... (default 0)
  --rank_size N       processes in the whole job (default: device_num)
  --log_dir DIR       per-rank logs (default logs/ascend)
USAGE
}

die() { echo "run_distributed_ascend.sh: error: $*" >&2; echo >&2; usage >&2; exit 2; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

RANK_TABLE="" CONFIG="" DEVICE_NUM=8 RANK_START=0 RANK_SIZE_ARG="" LOG_DIR=logs/ascend
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rank_table) RANK_TABLE="${2-}"; shift 2 ;;
        --config) CONFIG="${2-}"; shift 2 ;;
        --device_num) DEVICE_NUM="${2-}"; shift 2 ;;
        --rank_start) RANK_START="${2-}"; shift 2 ;;
        --rank_size) RANK_SIZE_ARG="${2-}"; shift 2 ;;
        --log_dir) LOG_DIR="${2-}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown argument '$1'" ;;
    esac
done
RANK_SIZE="${RANK_SIZE_ARG:-$DEVICE_NUM}"

[[ -n "$RANK_TABLE" ]] || die "--rank_table is required (the HCCL rank-table JSON of the job)"
[[ -f "$RANK_TABLE" ]] || die "rank table '$RANK_TABLE' does not exist; generate it with hccl_tools.py on each node"
[[ -n "$CONFIG" ]] || die "--config is required"
[[ -f "$CONFIG" ]] || die "config file '$CONFIG' does not exist"
is_int "$DEVICE_NUM" && (( DEVICE_NUM >= 1 && DEVICE_NUM <= 16 )) \
    || die "--device_num must be an integer from 1 to 16 (cards on one node), got '$DEVICE_NUM'"
is_int "$RANK_SIZE" && (( RANK_SIZE >= DEVICE_NUM )) \
    || die "--rank_size must be an integer >= --device_num ($DEVICE_NUM), got '$RANK_SIZE'"
is_int "$RANK_START" && (( RANK_START + DEVICE_NUM <= RANK_SIZE )) \
    || die "--rank_start must be an integer with rank_start + device_num <= rank_size ($RANK_SIZE), got '$RANK_START'"

mkdir -p "$LOG_DIR"
export RANK_TABLE_FILE="$(realpath "$RANK_TABLE")" RANK_SIZE
TRAIN="$(dirname "$0")/train.py"
declare -A RANK_OF
for (( i = 0; i < DEVICE_NUM; i++ )); do
    rank=$(( RANK_START + i ))
    DEVICE_ID=$i RANK_ID=$rank python "$TRAIN" --config "$CONFIG" --set train.device=Ascend "$@" \
        > "$LOG_DIR/rank_$rank.log" 2>&1 &
    RANK_OF[$!]=$rank
    echo "rank $rank (device $i, pid $!) log: $LOG_DIR/rank_$rank.log"
done

# No msrun watches these processes: when one fails, the others would wait forever in a collective, so the first
# failure stops the whole job.
for (( left = DEVICE_NUM; left > 0; left-- )); do
    wait -n -p pid
    status=$?
    if (( status != 0 )); then
        rank=${RANK_OF[$pid]}
        echo "run_distributed_ascend.sh: rank $rank failed (exit status $status); last lines of $LOG_DIR/rank_$rank.log:" >&2
        tail -n 5 "$LOG_DIR/rank_$rank.log" | sed 's/^/    /' >&2
        kill "${!RANK_OF[@]}" 2>/dev/null
        echo "run_distributed_ascend.sh: stopped the other ranks; resume with: -- --resume" >&2
        exit 1
    fi
done
echo "all $DEVICE_NUM ranks finished; logs in $LOG_DIR"
