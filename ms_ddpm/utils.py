"""Small helpers shared across the package: argument checks and the description of the machine a figure came from."""
import importlib.metadata
import inspect
import os
import platform

import numpy as np


def check_choice(name, value, choices):
    """Raise a ValueError naming the valid choices when `value` is not one of them; return `value`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_int(name, value, low, high=None):
    """`value` as an int if it is an integer (not a bool) in [low, high) (high None: no upper bound), else a
    ValueError saying what is allowed."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
        high is not None and value >= high
    ):
        allowed = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    return int(value)


def constructor_arguments(cls, kwargs):
    """`kwargs` completed with `cls`'s defaults for the arguments they leave out."""
    args = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
    args.update(kwargs)
    return args


def check_sizes(**sizes):
    """Each keyword argument an integer >= 1 (a list or tuple: each entry, named name[i]; None: unset, not checked),
    else the ValueError of `check_int`: a network's sizes checked before any layer is built, where a YAML override
    such as dim=abc would otherwise fail with an unrelated message."""
    for name, value in sizes.items():
        listed = isinstance(value, (list, tuple))
        entries = [(f"{name}[{i}]", v) for i, v in enumerate(value)] if listed else [(name, value)]
        for entry, v in entries:
            if v is not None:
                check_int(entry, v, 1)


def check_halvable(network, height, width, halvings, knob):
    """Raise a ValueError unless a height x width image can be halved `halvings` times (by `network`, a name, whose
    constructor argument `knob` sets how often); the message names both fixes."""
    multiple = 2 ** halvings
    if height % multiple != 0 or width % multiple != 0:
        raise ValueError(f"{network}: image size {height}x{width} cannot be halved {halvings} times; height and width "
                         f"must be multiples of {multiple} (change {knob} or the size)")


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_description():
    """CPU model, logical and usable cores, memory, platform, versions and load: the context a timing needs."""
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mindspore": _version("mindspore"),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
