import os
import re

import mindspore as ms
import pytest

# PyNative ops run synchronously in the test processes: on two cores shared by two workers, the hand-offs of
# MindSpore's asynchronous op pipeline between its threads cost more than the overlap saves (the same kernels run,
# so the numbers are the same; docs/performance.md, step 7). `runtime.set_runtime` does the same for CPU runs.
ms.runtime.launch_blocking()

# The longest modules first (by their measured durations): the suite runs on two workers, which take whole modules
# in collection order (setup.cfg: --dist loadfile --no-loadscope-reorder), and a long module handed out last would
# keep one worker busy while the other idles.
LONGEST_FIRST = ["test_tutorials.py", "test_readme_commands.py", "test_trainer.py", "test_latent.py",
                 "test_conditional.py", "test_score_samplers.py", "test_unet.py", "test_distributed.py",
                 "test_kernels.py", "test_export.py", "test_preemption.py", "test_ncsn_training.py", "test_evaluate.py",
                 "test_ode_likelihood.py", "test_unet_torch_equivalence.py", "test_pipeline.py"]


# The suite needs nothing beside the repository: its data are the digits the package carries (tests/helpers.py,
# MNIST5K). A test skipped for missing data would pass unnoticed on a clone alone, so such a skip is a failure; the
# skips left are for test-only dependencies, a compiler, devices, or commands that need the network.
MISSING_DATA = re.compile(r"\b(data|mnist\w*|digits)\b.*\b(not (at|found|there)|missing|absent|does not exist)\b",
                          re.IGNORECASE)


def fail_missing_data_skip(report):
    """A skip report whose reason says data are missing (MISSING_DATA), turned into a failure; other reports as
    they are."""
    if report.skipped and not hasattr(report, "wasxfail") and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2]
        if MISSING_DATA.search(reason):
            report.outcome = "failed"
            report.longrepr = f"skipped for missing data, which the suite must not need ({reason})"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return fail_missing_data_skip((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    return fail_missing_data_skip((yield))


# The per-test time limit of the default run is setup.cfg's `timeout` (300 s: the slowest default test took 108 s on
# two cores shared with other jobs); the end-to-end runs marked slow (the quick start itself, the benchmark) get an
# hour unless they name their own limit with @pytest.mark.timeout.
SLOW_TIMEOUT = 3600


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its order
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


@pytest.fixture(autouse=True)
def _pynative_by_default():
    """Each test starts in PyNative mode (MindSpore's default); tests that need graph mode set it themselves."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def pytest_configure(config):
    """In an xdist worker, close the worker's channel to the controller in every process it forks.

    MindSpore's dataset engine forks worker and clean-up processes that outlive a worker that dies (a crash, or a
    test that times out), and a fork inherits the pipes the controller reads the worker's reports from: the
    controller then waits for them to close, and so for the orphans, which keep waiting for their parent as long as
    it is an unreaped zombie. With the pipes closed in the children, a dead worker is seen at once and reported
    with the test it was running (setup.cfg: --max-worker-restart 0)."""
    worker = next((p for p in config.pluginmanager.get_plugins() if type(p).__name__ == "WorkerInteractor"), None)
    if worker is None:  # the controller, or a run without xdist
        return
    io = worker.channel.gateway._io  # execnet's pipes to the controller (no public accessor)
    channel_fds = (io.outfile.fileno(), io.infile.fileno())

    def close_channel():
        for fd in channel_fds:
            os.close(fd)

    os.register_at_fork(after_in_child=close_channel)
