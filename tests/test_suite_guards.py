"""The suite's own guards (setup.cfg and tests/conftest.py): no run can hang, a crash or a hang ends with the name
of the test it happened in, and the suite needs nothing beside the repository (a test skipped for missing data
fails; the other skips, for test-only dependencies, a compiler, devices or the network, stay skips).

A small suite is run in a subprocess with this suite's pytest settings and conftest: one test dies (SIGKILL) while
a process it forked waits for it, as the dataset workers of MindSpore's engine outlive a crashed test process; one
hangs past a short timeout. Without the conftest's guard the first deadlocks (the controller waits for the pipes
the child inherited, the child for its parent to be reaped; here the child gives up after two minutes), and
without the timeout the second hangs for ever.
"""
import configparser
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import fail_missing_data_skip

REPO = Path(__file__).resolve().parents[1]

TESTS = '''
import os, signal, time

def test_dies_with_a_child():
    parent = os.getpid()
    if os.fork() == 0:  # waits for its parent as MindSpore's dataset workers do: until kill(parent, 0) fails, which
        for _ in range(1200):  # it does not while the dead parent is an unreaped zombie
            try:
                os.kill(parent, 0)
            except OSError:
                os._exit(0)
            time.sleep(0.1)
        os._exit(0)
    os.kill(parent, signal.SIGKILL)

def test_after_the_crash_in_the_same_module():
    pass
'''
HANGS = '''
import time

def test_hangs():
    time.sleep(120)

def test_other():
    pass
'''


def test_a_crash_and_a_hang_end_the_run_with_their_names(tmp_path):
    settings = configparser.ConfigParser(interpolation=None)
    settings.read(REPO / "setup.cfg")
    section = dict(settings["tool:pytest"])
    section["timeout"] = "5"  # short, for the hanging test
    section.pop("testpaths")
    ini = configparser.ConfigParser(interpolation=None)
    ini["pytest"] = section
    with open(tmp_path / "pytest.ini", "w") as f:
        ini.write(f)
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_crash.py").write_text(TESTS)
    (tmp_path / "test_hang.py").write_text(HANGS)

    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:randomly"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=100)
    elapsed = time.monotonic() - start
    out = result.stdout + result.stderr
    assert elapsed < 60, f"the run waited for the crashed worker's child ({elapsed:.0f} s):\n{out[-3000:]}"
    assert result.returncode == 1, out[-3000:]
    assert "crashed while running 'test_crash.py::test_dies_with_a_child'" in out, out[-3000:]
    assert "crashed while running 'test_hang.py::test_hangs'" in out, out[-3000:]  # ended by pytest-timeout


# skips the suite once had for data it read from a folder beside the repository
MISSING_DATA_SKIPS = ["the mnist5k data set is not at /elsewhere/data/mnist5k",
                      "real MNIST subset not found at /elsewhere/data/mnist5k",
                      "the CIFAR-10 data set is missing"]
# skips the suite has
OTHER_SKIPS = ["torch is a test-only dependency: pip install -e '.[dev]'",
               "no C++ compiler 'c++' on PATH: the kernels cannot be built here",
               "`ms-ddpm train --set data.download=true` downloads mnist into data/mnist; the tests run offline",
               "`ms-ddpm sample --ckpt my.ckpt` needs my.ckpt, which the reader brings (no command shown makes it)",
               "`scripts/run_distributed_ascend.sh 8` needs 8 devices (checked with the training stood in)"]


def skip_report(reason, **kwargs):
    return pytest.TestReport("tests/test_x.py::test_x", ("tests/test_x.py", 1, "test_x"), {}, "skipped",
                             ("tests/test_x.py", 2, f"Skipped: {reason}"), "setup", **kwargs)


@pytest.mark.parametrize("reason", MISSING_DATA_SKIPS)
def test_a_skip_for_missing_data_fails(reason):
    report = fail_missing_data_skip(skip_report(reason))
    assert report.failed and reason in report.longrepr


@pytest.mark.parametrize("reason", OTHER_SKIPS)
def test_other_skips_stay_skips(reason):
    report = fail_missing_data_skip(skip_report(reason))
    assert report.skipped and report.longrepr[2] == f"Skipped: {reason}"
