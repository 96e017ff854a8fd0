"""Data-parallel setup: one process per device, started by `msrun` or by an Ascend rank-table launcher."""
import os

import mindspore as ms


def launched_distributed():
    """True inside a process started by msrun (a worker, or the scheduler msrun runs with the same script) or by a
    rank-table launcher (RANK_TABLE_FILE)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED") or bool(os.environ.get("RANK_TABLE_FILE"))


def init_distributed():
    """Join the process group and return (rank, group_size); (0, 1) when not launched as a distributed job.

    `init()` picks the collective backend of the device set before it (HCCL on Ascend, NCCL on GPU, MCCL on CPU),
    so the device must already be set. Data parallelism: each rank reads its own shard and gradients are averaged
    across ranks (the trainer's DistributedGradReducer), so all ranks hold the same weights after every step.
    """
    if not launched_distributed():
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()  # in msrun's scheduler process this serves the cluster and exits with it
    rank, group_size = get_rank(), get_group_size()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=group_size)
    return rank, group_size
