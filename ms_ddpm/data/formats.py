"""On-disk layouts of the datasets that `create_dataset` reads, and cheap checks of their files.

IDX (LeCun, Bottou, Bengio & Haffner 1998; format described on the MNIST database page): a big-endian header,
    magic number (4 bytes: 0, 0, type code 0x08 = unsigned byte, number of dimensions), then one 4-byte size per
    dimension, then the data in C order. Images: magic 2051 (0x00000803), sizes (N, rows, cols); labels: magic 2049
    (0x00000801), size (N,). MNIST and Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) use the same file names:
    train-{images-idx3,labels-idx1}-ubyte and t10k-{images-idx3,labels-idx1}-ubyte.
CIFAR-10 binary version (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images"; layout from the
    dataset page): data_batch_1.bin .. data_batch_5.bin (train) and test_batch.bin, each 10,000 records of
    1 label byte + 3,072 pixel bytes (1,024 red, then green, then blue, each 32x32 row-major).

The checks read headers and file sizes only, so they cost microseconds. They exist to turn a missing, truncated or
wrong file into an error that names the file and the fix; MindSpore's readers would otherwise fail inside the
pipeline's C++ threads, at the first batch, with a message about its own source files. MindSpore's
`Cifar10Dataset` also assumes exactly 10,000 records per file (it counts 10,000 per file found and fails to read
shorter ones), so a CIFAR file of any other size is reported as wrong.
"""
import math
import os
import struct

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
CIFAR10_RECORDS_PER_FILE = 10000
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32
# What `tar xzf cifar-10-binary.tar.gz` creates; `create_dataset` also accepts its parent folder as root.
CIFAR10_ARCHIVE_FOLDER = "cifar-10-batches-bin"

SPLITS = ("train", "test")

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
FILES = {"mnist": IDX_FILES, "fashion_mnist": IDX_FILES, "cifar10": CIFAR10_FILES}


def expected_files(name, splits=SPLITS):
    """File names (no folder) that dataset `name` needs for `splits`, in a fixed order."""
    return [f for split in splits for f in FILES[name][split]]


def read_idx_header(path):
    """(magic, sizes) of an IDX file, e.g. (2051, (60000, 28, 28)); raises ValueError if the header is cut short."""
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4:
            raise ValueError("file too short for an IDX header")
        magic = struct.unpack(">I", head)[0]
        ndim = magic & 0xFF
        sizes = f.read(4 * ndim)
        if len(sizes) < 4 * ndim:
            raise ValueError("file too short for an IDX header")
    return magic, struct.unpack(f">{ndim}I", sizes)


def _idx_problem(path, magic):
    """None if `path` is an IDX ubyte file with the given magic and a size that matches its header, else why not."""
    with open(path, "rb") as f:
        head = f.read(4)
    # The magic is checked before the sizes: a gzip file's first bytes would announce 32 dimensions.
    found_magic = struct.unpack(">I", head)[0] if len(head) == 4 else None
    if found_magic != magic:
        return f"magic number {found_magic}, expected {magic} (still gzip-compressed, or not an IDX file?)"
    try:
        _, sizes = read_idx_header(path)
    except ValueError as err:
        return str(err)
    expected = 4 + 4 * len(sizes) + math.prod(sizes)
    actual = os.path.getsize(path)
    if actual != expected:
        return f"{actual} bytes, but its header {tuple(sizes)} needs {expected} (truncated download?)"
    return None


def file_problems(name, root, splits=SPLITS):
    """Problems with the files of dataset `name` under `root` for `splits`, as (kind, message) pairs.

    kind is "missing" or "invalid"; an empty list means every file is there and its header and size agree with the
    format (pixel contents are not checked: that is what the archive checksums are for).
    """
    problems = []
    for split in splits:
        n_before = len(problems)
        for fname in FILES[name][split]:
            path = os.path.join(root, fname)
            if not os.path.isfile(path):
                problems.append(("missing", fname))
                continue
            if name == "cifar10":
                size = os.path.getsize(path)
                expected = CIFAR10_RECORDS_PER_FILE * CIFAR10_RECORD_BYTES
                why = None if size == expected else f"{size} bytes, expected {expected} (10,000 records of 3,073)"
            elif "images" in fname:
                why = _idx_problem(path, IDX_IMAGES_MAGIC)
                if why is None and read_idx_header(path)[1][1:] != NATIVE_IMAGE_SIZE[name]:
                    rows, cols = read_idx_header(path)[1][1:]
                    why = f"{rows}x{cols} images, but MindSpore's MnistDataset reads 28x28 ones only"
            else:
                why = _idx_problem(path, IDX_LABELS_MAGIC)
            if why is not None:
                problems.append(("invalid", f"{fname}: {why}"))
        if name != "cifar10" and len(problems) == n_before:
            # MnistDataset pairs image i with label i; a count mismatch would fail inside the pipeline.
            images, labels = (os.path.join(root, f) for f in FILES[name][split])
            n_images, n_labels = read_idx_header(images)[1][0], read_idx_header(labels)[1][0]
            if n_images != n_labels:
                problems.append(("invalid", f"{split} split has {n_images} images but {n_labels} labels"))
    return problems


# (height, width) of the stored images; MindSpore's MnistDataset reads 28x28 IDX images only
NATIVE_IMAGE_SIZE = {"mnist": (28, 28), "fashion_mnist": (28, 28), "cifar10": (32, 32)}
