# Sourced by run_distributed.sh and run_distributed_ascend.sh (after they define `usage`): argument checks, HCCL
# timeouts, and what to tell the user when a job fails. Bash 4.4 features only (EulerOS, Ubuntu 18.04 / 20.04).

PROG="${0##*/}"
die() { echo "$PROG: error: $*" >&2; echo >&2; usage >&2; exit 2; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

# HCCL (Ascend) waits HCCL_CONNECT_TIMEOUT seconds for the ranks to connect and HCCL_EXEC_TIMEOUT seconds for all of
# them to reach a collective. The defaults (CANN's 120 s, which `import mindspore` raises to 600 s, and 1800 s) are
# short here: the ranks connect in their first collective, which rank 0 reaches only after downloading a missing
# data set, and rank 0 samples the periodic grids (1,000 DDPM steps in configs/ddpm_cifar10_ascend.yaml) while the
# others wait in the next all-reduce. Export either variable to override it (CANN accepts 120-7200 s and 68-17340 s,
# the latter rounded down to a multiple of 68 s).
export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}" HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-3600}"
is_int "$HCCL_CONNECT_TIMEOUT" || die "HCCL_CONNECT_TIMEOUT must be a number of seconds, got '$HCCL_CONNECT_TIMEOUT'"
is_int "$HCCL_EXEC_TIMEOUT" || die "HCCL_EXEC_TIMEOUT must be a number of seconds, got '$HCCL_EXEC_TIMEOUT'"

# The lines `ms-ddpm train` ends with when it exits with status 2 (a config, argument or data error, or a loss that
# stays NaN: something to fix, not to resume), one per distinct error, from the given logs.
user_errors() { (( $# )) && grep -h -m1 '^ms-ddpm train: error: ' "$@" 2>/dev/null | sort -u; }

# report_user_errors ERRORS: say that the job stopped on those errors and how to go on.
report_user_errors() {
    echo "$PROG: ms-ddpm train stopped on an error in the command or config (exit status 2):" >&2
    sed 's/^/    /' <<<"$1" >&2
    echo "$PROG: fix it and launch again" >&2
}

# advise_resume TRAIN_ARGS...: after a crash, say whether and how the run can continue, from the newest checkpoint
# in its train.output_dir (the config and --set overrides resolved as ms-ddpm train resolves them).
advise_resume() {
    local ckpt
    ckpt=$(python - "$@" 2>/dev/null <<'PY'
import sys

from ms_ddpm.cli import build_parser
from ms_ddpm.config import Config
from ms_ddpm.checkpoint import list_checkpoints

args = build_parser().parse_args(["train", *sys.argv[1:]])
found = list_checkpoints(Config.load(args.config, args.set).train.output_dir)
print(found[-1] if found else "")
PY
)
    if [[ -z "$ckpt" ]]; then
        echo "$PROG: no checkpoint in the run's train.output_dir to resume from: launching again starts at step 0" >&2
    elif [[ " $* " == *" --resume "* ]]; then
        echo "$PROG: launch the same command again to continue from $ckpt" >&2
    else
        echo "$PROG: to continue from $ckpt, launch the same command with: -- --resume" >&2
    fi
}
