"""Download, verify and unpack the official dataset archives (used by `create_dataset(..., download=True)`).

Sources and MD5 checksums of the archives as published:
    MNIST          the four train-/t10k- *-idx?-ubyte.gz files from the mirror that torchvision uses since
                   yann.lecun.com stopped serving them (torchvision.datasets.MNIST.mirrors / .resources);
    Fashion-MNIST  the same four file names from Zalando's bucket (torchvision.datasets.FashionMNIST);
    CIFAR-10       cifar-10-binary.tar.gz, the "binary version (suitable for C programs)" from the dataset page
                   (https://www.cs.toronto.edu/~kriz/cifar.html, which lists the MD5; torchvision uses the
                   Python-pickle version instead, which MindSpore's Cifar10Dataset cannot read).

Everything is fetched into a hidden staging folder inside `root`, checked (archive MD5, then the unpacked files'
headers and sizes with `formats.file_problems`) and only then moved into `root`, file by file with `os.replace`.
A failed or corrupt download therefore leaves `root` as it was: no half-written file that a later call would read.
The staging folder is removed whatever happens.

`MIRRORS` holds the base URL of each dataset and `ARCHIVES` the file names and checksums; both are plain module
dicts so that a local mirror (or the tests' HTTP server on 127.0.0.1) can stand in for the official hosts.
"""
import gzip
import hashlib
import os
import posixpath
import shutil
import tarfile
import tempfile

from download import download

from ..utils import check_choice
from .formats import expected_files, file_problems

MIRRORS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
}

ARCHIVES = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
}

# Unpacked alongside the data files when present; not needed by the readers.
_EXTRAS = {"cifar10": ("batches.meta.txt", "readme.html")}


class DownloadError(RuntimeError):
    """A download that failed or did not match its checksum; the message says what to do."""


def md5sum(path, chunk_size=1 << 20):
    """Hex MD5 digest of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unpack(archive_path, out_dir, wanted):
    """Write the files of a .gz or .tar.gz archive whose base names are in `wanted` into `out_dir` (flat).

    Tar members are matched by base name and written with their contents only (no paths, links or permissions
    from the archive), so a hostile archive cannot write outside `out_dir`.
    """
    name = os.path.basename(archive_path)
    if name.endswith(".tar.gz"):
        with tarfile.open(archive_path, "r:gz") as tar:
            for member in tar:
                base = posixpath.basename(member.name)
                if member.isfile() and base in wanted:
                    with tar.extractfile(member) as src, open(os.path.join(out_dir, base), "wb") as dst:
                        shutil.copyfileobj(src, dst)
    elif name.endswith(".gz"):
        with gzip.open(archive_path, "rb") as src, open(os.path.join(out_dir, name[: -len(".gz")]), "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        raise ValueError(f"don't know how to unpack {name}")


def download_dataset(name, root, verbose=True):
    """Make sure `root` holds every file of dataset `name` (both splits), downloading what is needed.

    Does nothing when all files are already present and well-formed. Otherwise fetches all archives of the
    dataset from `MIRRORS[name]`, checks their MD5 against `ARCHIVES[name]`, unpacks them and replaces the files
    in `root` (see the module docstring for why nothing is written to `root` before every check has passed).

    Args:
        name: one of ARCHIVES ("mnist", "fashion_mnist", "cifar10").
        root: folder that receives the unpacked files (created if missing), e.g. root/train-images-idx3-ubyte or
            root/data_batch_1.bin. None is a ValueError saying to give one.
        verbose: print the URLs and a progress bar.
    Returns:
        root.
    Raises:
        ValueError: root is None.
        DownloadError: a download failed, a checksum did not match, or the archives lacked expected files.
    """
    check_choice("name", name, ARCHIVES)
    if root is None:
        embedded = "; without download, root=None reads the MNIST digits the package carries" if name == "mnist" else ""
        raise ValueError(
            f"download=True (data.download) needs root (data.root): the folder to fetch the full {name} data set "
            f"into{embedded}"
        )
    root = os.fspath(root)
    if not file_problems(name, root):
        return root
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".download-", dir=root)
    try:
        unpacked = os.path.join(staging, "unpacked")
        os.mkdir(unpacked)
        wanted = set(expected_files(name)) | set(_EXTRAS.get(name, ()))
        for archive, md5 in ARCHIVES[name].items():
            url = MIRRORS[name].rstrip("/") + "/" + archive
            path = os.path.join(staging, archive)
            try:
                download(url, path, kind="file", progressbar=verbose, replace=True, verbose=verbose)
            except Exception as err:  # the download package wraps every failure in a RuntimeError
                raise DownloadError(
                    f"could not download {url}: {err}\nCheck the network (or proxy), or fetch the archives by hand "
                    f"and unpack them into {root!r}; ms_ddpm.data.fetch.MIRRORS[{name!r}] sets the base URL."
                ) from None
            found = md5sum(path)
            if found != md5:
                raise DownloadError(
                    f"MD5 mismatch for {url}: expected {md5}, got {found}. The download is corrupt or the mirror "
                    f"serves a different file; nothing was written to {root!r}. Try again, or use another mirror "
                    f"via ms_ddpm.data.fetch.MIRRORS[{name!r}]."
                )
            _unpack(path, unpacked, wanted)
            os.remove(path)
        problems = file_problems(name, unpacked)
        if problems:
            listed = "; ".join(message for _, message in problems)
            raise DownloadError(
                f"the archives from {MIRRORS[name]} passed their checksums but did not unpack to the expected "
                f"files ({listed}); nothing was written to {root!r}."
            )
        for fname in sorted(os.listdir(unpacked)):
            os.replace(os.path.join(unpacked, fname), os.path.join(root, fname))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
