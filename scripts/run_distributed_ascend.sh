#!/usr/bin/env bash
# Classic Ascend launcher: one process per NPU, addressed through a rank-table (HCCL) JSON file.
#
#   bash scripts/run_distributed_ascend.sh --rank_table hccl_8p.json --config configs/ddpm_cifar10_ascend.yaml
#   bash scripts/run_distributed_ascend.sh --rank_table hccl_16p.json --rank_size 16 --device_num 8 --rank_start 8 --config configs/ddpm_cifar10_ascend.yaml   # node 2 of 2
#
# Each process gets DEVICE_ID (the card on this node), RANK_ID (its rank in the job) and RANK_SIZE, and writes
# LOG_DIR/rank_<RANK_ID>.log. Arguments after "--" go to `ms-ddpm train`. The script waits for all processes; the
# first that fails stops the others (as does interrupting the script). It then exits with status 2 and the error
# when ms-ddpm refused the command or config, or else names the rank and says whether the run can resume.
# HCCL timeouts: see scripts/launch_common.sh. Run it with the virtual environment active.
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

source "$(dirname "$0")/launch_common.sh"

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
declare -A RANK_OF  # pid -> rank of the processes still running

# stop_ranks: SIGTERM to the ranks still running, SIGKILL to those left after 30 s, so that none keeps its NPU
stop_ranks() {
    local pid i alive
    (( ${#RANK_OF[@]} )) || return 0
    kill "${!RANK_OF[@]}" 2>/dev/null
    for (( i = 0; i < 30; i++ )); do
        alive=0
        for pid in "${!RANK_OF[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        (( alive )) || break
        sleep 1
    done
    kill -9 "${!RANK_OF[@]}" 2>/dev/null
    wait
}
# background processes of a script ignore SIGINT: without this trap, Ctrl-C would leave the ranks running
trap 'echo "$PROG: interrupted; stopping the ranks" >&2; stop_ranks; exit 130' INT
trap 'stop_ranks; exit 143' TERM

for (( i = 0; i < DEVICE_NUM; i++ )); do
    rank=$(( RANK_START + i ))
    DEVICE_ID=$i RANK_ID=$rank python "$TRAIN" --config "$CONFIG" --set train.device=Ascend "$@" \
        > "$LOG_DIR/rank_$rank.log" 2>&1 &
    RANK_OF[$!]=$rank
    echo "rank $rank (device $i, pid $!) log: $LOG_DIR/rank_$rank.log"
done

# No msrun watches these processes: when one fails, the others would wait forever in a collective, so the first
# failure stops the whole job. Polled with kill -0: `wait -n -p`, which would say which process ended, needs bash 5.1.
while (( ${#RANK_OF[@]} )); do
    for pid in "${!RANK_OF[@]}"; do
        kill -0 "$pid" 2>/dev/null && continue
        wait "$pid"  # the exit status bash kept for this process
        status=$?
        rank=${RANK_OF[$pid]}
        unset "RANK_OF[$pid]"
        (( status == 0 )) && continue
        stop_ranks
        log="$LOG_DIR/rank_$rank.log"
        errors=$( (( status == 2 )) && user_errors "$log")
        if [[ -n "$errors" ]]; then
            echo "$PROG: rank $rank failed; stopped the other ranks" >&2
            report_user_errors "$errors"
            exit 2
        fi
        echo "$PROG: rank $rank failed (exit status $status); last lines of $log:" >&2
        tail -n 5 "$log" | sed 's/^/    /' >&2
        echo "$PROG: stopped the other ranks" >&2
        advise_resume --config "$CONFIG" --set train.device=Ascend "$@"
        exit 1
    done
    sleep 1
done
echo "all $DEVICE_NUM ranks finished; logs in $LOG_DIR"
