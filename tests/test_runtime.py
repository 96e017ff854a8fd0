"""The runtime's Ascend logic, on CPU with the device facts patched in: DEVICE_ID under a rank table, bfloat16
refused on the 910A, and the precision mode that keeps float32 runs in float32 (docs/ascend.md)."""
import mindspore as ms
import pytest

from ms_ddpm import runtime
from ms_ddpm.config import Config, ConfigError


def train_cfg(**train):
    return Config.from_dict({"train": train}).train


def test_rank_table_device_id():
    assert runtime.device_id_from_rank_table({"DEVICE_ID": "3"}) is None  # msrun binds devices itself
    assert runtime.device_id_from_rank_table({"RANK_TABLE_FILE": "rt.json", "DEVICE_ID": "3"}) == 3
    for bad in ({"RANK_TABLE_FILE": "rt.json"}, {"RANK_TABLE_FILE": "rt.json", "DEVICE_ID": "npu1"}):
        with pytest.raises(ConfigError, match="RANK_TABLE_FILE is set but DEVICE_ID is .*must export DEVICE_ID"):
            runtime.device_id_from_rank_table(bad)


def test_set_runtime_binds_the_rank_tables_device(monkeypatch):
    calls = []
    monkeypatch.setattr(ms, "set_device", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setenv("RANK_TABLE_FILE", "rank_table.json")
    monkeypatch.setenv("DEVICE_ID", "5")
    runtime.set_runtime(train_cfg(device="GPU", mode="pynative"))  # this process's device is CPU: set_device runs
    assert calls == [(("GPU",), {"device_id": 5})]


@pytest.mark.parametrize("device, blocking", [("CPU", True), ("GPU", False)])
def test_ops_run_synchronously_on_cpu_only(monkeypatch, device, blocking):
    calls = []
    monkeypatch.setattr(ms, "set_device", lambda *args, **kwargs: None)
    monkeypatch.setattr(ms.runtime, "launch_blocking", lambda: calls.append("launch_blocking"))
    runtime.set_runtime(train_cfg(device=device, mode="pynative"))
    assert calls == (["launch_blocking"] if blocking else [])


@pytest.mark.parametrize("soc, amp_level, amp_dtype, refused", [
    ("ascend910", "O2", "bfloat16", True),  # 910A: no bfloat16 kernels
    ("ascend910", "O2", "float16", False),
    ("ascend910", "O0", "bfloat16", False),  # amp_dtype unused at O0
    ("ascend910b", "O2", "bfloat16", False),
    ("ascend910_93", "O1", "bfloat16", False),
])
def test_bfloat16_is_refused_on_the_910a(soc, amp_level, amp_dtype, refused):
    cfg = train_cfg(device="Ascend", amp_level=amp_level, amp_dtype=amp_dtype)
    if refused:
        with pytest.raises(ConfigError, match="bfloat16 mixed precision needs an Atlas A2 .910B. or newer NPU"):
            runtime.check_amp_dtype(cfg, soc)
    else:
        runtime.check_amp_dtype(cfg, soc)


class FakeAscend:
    """MSContext.get_instance().get_ascend_soc_version() of an NPU of SoC `soc`."""

    soc = None

    @classmethod
    def get_instance(cls):
        return cls

    @classmethod
    def get_ascend_soc_version(cls):
        return cls.soc


@pytest.mark.parametrize("soc", ["ascend910", "ascend910b"])
def test_set_runtime_on_ascend_checks_the_soc_and_keeps_float32_runs_in_float32(monkeypatch, soc):
    from mindspore.device_context.ascend import op_precision

    modes, devices = [], []
    monkeypatch.setattr(ms, "set_device", lambda *args, **kwargs: devices.append(args))
    monkeypatch.setattr("mindspore._c_expression.MSContext", FakeAscend)
    monkeypatch.setattr(FakeAscend, "soc", soc)
    monkeypatch.setattr(op_precision, "precision_mode", modes.append)
    runtime.set_runtime(train_cfg(device="Ascend", mode="pynative", amp_level="O0"))
    assert devices == [("Ascend",)] and modes == ["must_keep_origin_dtype"]
    runtime.set_runtime(train_cfg(device="Ascend", mode="pynative", amp_level="O2", amp_dtype="float16"))
    assert modes == ["must_keep_origin_dtype"]  # mixed precision: the default mode is left alone
    cfg = train_cfg(device="Ascend", mode="pynative", amp_level="O2", amp_dtype="bfloat16")
    if soc == "ascend910":
        with pytest.raises(ConfigError, match="SoC ascend910"):
            runtime.set_runtime(cfg)
    else:
        runtime.set_runtime(cfg)


def test_ranks_download_one_at_a_time_and_say_what_they_wait_for(tmp_path, monkeypatch, capsys):
    """Two ranks of one machine (threads here: flock excludes two open files of one process too): one downloads,
    the other waits on the lock file, not in a collective, and says so."""
    import threading
    import time

    from ms_ddpm.train import distributed

    active, overlaps, done = [], [], []

    def slow_download(name, root, verbose=True):
        active.append(name)
        overlaps.append(len(active))
        time.sleep(0.3)
        active.remove(name)
        done.append(verbose)

    monkeypatch.setattr(distributed, "download_dataset", slow_download)
    first = threading.Thread(target=distributed.download_once, args=("mnist", tmp_path / "data", 0))
    first.start()
    while not active:  # rank 0 holds the lock and is downloading
        time.sleep(0.01)
    distributed.download_once("mnist", tmp_path / "data", 1)
    first.join()
    assert overlaps == [1, 1] and done == [True, False]
    assert (f"rank 1: waiting for another process to finish downloading mnist into {tmp_path / 'data'}"
            in capsys.readouterr().out)
