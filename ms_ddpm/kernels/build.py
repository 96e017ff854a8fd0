"""Compile the C++ kernels of `csrc/` on first use with the system compiler, cache the library, load it.

All kernels go into one shared library, built with `-O3 -march=native`. Its file name carries a digest of
everything the binary depends on: the sources, the compiler and its flags, the instruction-set extensions that
`-march=native` enables on this CPU (the compiler's predefined macros), and the MindSpore version. A cache shared
by the machines of a cluster therefore holds one library per kind of CPU, and no machine loads a library built for
instructions it lacks. The compiler writes a temporary file that is then renamed into place, so processes that
start at once (the ranks of a job) never load a half-written library; they may each compile, and the last rename
wins with identical bytes.

Environment: `MS_DDPM_KERNELS=0` keeps MindSpore's native ops; `MS_DDPM_KERNEL_CACHE` sets the cache folder
(default `$XDG_CACHE_HOME/ms_ddpm/kernels`, else `~/.cache/ms_ddpm/kernels`); `CXX` names the compiler (default
`c++`).
"""
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

CSRC = Path(__file__).resolve().with_name("csrc")
# -fopenmp-simd: the `omp simd` loops (reductions) vectorise without OpenMP's runtime; -fno-trapping-math lets the
# compiler vectorise the float-to-int conversion in exp (no kernel reads floating-point exception flags)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp-simd", "-fno-trapping-math", "-shared", "-fPIC", "-pthread")
LIBS = ("-ldl",)  # after the sources, for linkers that drop unreferenced libraries

logger = logging.getLogger(__name__)
_loaded = {}  # one build attempt per process: {"library": Library or None}


class Library(NamedTuple):
    """The loaded kernel library: its path, and whether its convolutions found the oneDNN sgemm they call."""

    path: Path
    convolutions: bool


class KernelBuildError(RuntimeError):
    """The kernels could not be compiled or loaded; the message says why in one line."""


def cache_dir():
    if os.environ.get("MS_DDPM_KERNEL_CACHE"):
        return Path(os.environ["MS_DDPM_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ms_ddpm" / "kernels"


def compiler():
    return os.environ.get("CXX") or "c++"


def _run(cmd):
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise KernelBuildError(f"{cmd[0]}: {err}") from err
    if proc.returncode != 0:
        first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip()[:200])
        raise KernelBuildError(f"{' '.join(cmd[:2])} ... failed: {first}")
    return proc.stdout


def library_path(cxx):
    """Where the library for these sources, this compiler, this CPU and this MindSpore lives in the cache."""
    mindspore_version = importlib.metadata.version("mindspore")
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join(FLAGS + LIBS).encode())
    digest.update(_run([cxx, "--version"]).encode())
    # the instruction sets -march=native turns on here (__AVX2__, __FMA__, __AVX512F__, __ARM_NEON, ...)
    digest.update(_run([cxx, "-march=native", "-dM", "-E", "-x", "c++", os.devnull]).encode())
    return cache_dir() / f"ms_ddpm_kernels-mindspore{mindspore_version}-{digest.hexdigest()[:16]}.so"


def build():
    """Path of the compiled library, compiling it when the cache lacks it. Raises KernelBuildError."""
    cxx = compiler()
    if shutil.which(cxx) is None:
        raise KernelBuildError(f"no C++ compiler {cxx!r} on PATH (set CXX)")
    target = library_path(cxx)
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as err:
        raise KernelBuildError(f"cannot write the kernel cache {target.parent}: {err}") from err
    try:
        _run([cxx, *FLAGS, f"-I{CSRC}", *map(str, sorted(CSRC.glob("*.cc"))), *LIBS, "-o", tmp])
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: another process sees no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def onednn_path():
    """MindSpore's own oneDNN (its CPU convolutions use it too), whose sgemm the convolution kernels call."""
    spec = importlib.util.find_spec("mindspore")
    return Path(spec.origin).parent / "lib" / "libdnnl.so.2"


def load():
    """The loaded `Library`, or None (with a one-line warning, once per process) when it cannot be built.

    None also when `MS_DDPM_KERNELS=0`, without a warning. The kernels use as many threads as this process may run
    on (its CPU affinity, which launchers such as msrun with core binding narrow). Without MindSpore's oneDNN (a
    build of MindSpore without it) the convolutions keep MindSpore's, with a warning, and the rest is used.
    """
    if "library" not in _loaded:
        _loaded["library"] = None
        if os.environ.get("MS_DDPM_KERNELS", "1") != "0":
            try:
                path = build()
                lib = ctypes.CDLL(str(path))
            except (KernelBuildError, OSError) as err:
                logger.warning("ms_ddpm: CPU kernels unavailable, using MindSpore's native ops (%s)", err)
            else:
                lib.MsDdpmSetNumThreads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                        else os.cpu_count() or 1)
                lib.MsDdpmLoadSgemm.argtypes = [ctypes.c_char_p]
                convolutions = bool(lib.MsDdpmLoadSgemm(str(onednn_path()).encode()))
                if not convolutions:
                    logger.warning("ms_ddpm: %s not found, the convolutions use MindSpore's own", onednn_path())
                _loaded["library"] = Library(path, convolutions)
    return _loaded["library"]
