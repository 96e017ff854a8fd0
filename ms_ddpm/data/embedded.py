"""The MNIST subset the package carries (`mnist5k/`, see its README): what `create_dataset("mnist", root=None)` reads.

MindSpore's `MnistDataset` reads unpacked IDX files, so the four gzip'd files are unpacked once into a per-user
cache folder ($XDG_CACHE_HOME/ms_ddpm, else ~/.cache/ms_ddpm) and read from there by the same reader as any other
MNIST folder. The folder's name carries a digest of the packed files, so a package with other digits never reads
a stale copy. The files are written into a staging folder beside it and renamed into place in one step, so
processes unpacking at the same time (the ranks of a job) and a crash mid-way never leave a half-written folder.
"""
import hashlib
import os
import shutil
import tempfile

from .fetch import _unpack
from .formats import expected_files, file_problems

PACKED_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist5k")


def cache_folder():
    """The per-user cache folder of ms_ddpm: $XDG_CACHE_HOME/ms_ddpm, else ~/.cache/ms_ddpm."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ms_ddpm")


def _packed_files():
    return [os.path.join(PACKED_FOLDER, name + ".gz") for name in expected_files("mnist")]


def _digest(paths):
    digest = hashlib.md5()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def embedded_mnist_root():
    """The folder holding the unpacked IDX files of the carried digits, unpacking them first if needed."""
    packed = _packed_files()
    target = os.path.join(cache_folder(), f"mnist5k-{_digest(packed)}")
    if not file_problems("mnist", target):
        return target
    try:
        os.makedirs(cache_folder(), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".mnist5k-", dir=cache_folder())
        try:
            for path in packed:
                _unpack(path, staging, expected_files("mnist"))
            problems = file_problems("mnist", staging)
            if problems:
                listed = "; ".join(message for _, message in problems)
                raise ValueError(f"the MNIST digits the package carries are damaged ({listed}): reinstall ms_ddpm")
            if os.path.isdir(target):  # a damaged copy (file_problems above): replaced as a whole
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.rename(staging, target)
            except OSError:
                if file_problems("mnist", target):  # not another process's complete copy
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as err:
        raise ValueError(
            f"cannot unpack the MNIST digits the package carries into {cache_folder()!r} ({err}): set XDG_CACHE_HOME "
            f"to a writable folder, or data.root to a folder holding the unpacked IDX files"
        ) from None
    return target
