"""Data-parallel setup: one process per device, started by `msrun` or by an Ascend rank-table launcher."""
import os
from pathlib import Path

import mindspore as ms

from ..data import download_dataset


def launched_distributed():
    """True inside a process started by msrun (a worker, or the scheduler msrun runs with the same script) or by a
    rank-table launcher (RANK_TABLE_FILE)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED") or bool(os.environ.get("RANK_TABLE_FILE"))


def init_distributed():
    """Join the process group and return (rank, group_size); (0, 1) when not launched as a distributed job.

    `init()` picks the collective backend of the device set before it (HCCL on Ascend, NCCL on GPU, MCCL on CPU),
    so the device must already be set. Data parallelism: each rank reads its own shard and gradients are averaged
    across ranks once per update (`ms_ddpm.train.step.DataParallelReduce`), so all ranks hold the same weights after
    every step.
    """
    if not launched_distributed():
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()  # in msrun's scheduler process this serves the cluster and exits with it
    rank, group_size = get_rank(), get_group_size()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=group_size)
    return rank, group_size


def download_once(name, root, rank):
    """Fetch data set `name` into `root` if it is missing, once per machine (or per shared file system): the ranks
    take an exclusive lock on a file in `root` in turn, the first downloads, the others find the files in place.
    A file lock rather than a collective, so no rank waits for a long download inside a collective bounded by
    HCCL_CONNECT_TIMEOUT (120 s by default); a rank that has to wait says what it waits for. On several machines
    without a shared file system the first rank of each machine downloads; pre-staged data skips all of it.
    """
    import fcntl  # POSIX; distributed jobs run on Linux

    if root is None:
        return download_dataset(name, root)  # says which setting to give
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(Path(root) / ".download.lock", "w", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"rank {rank}: waiting for another process to finish downloading {name} into {root} "
                  f"(it holds {lock.name})", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        download_dataset(name, root, verbose=rank == 0)
