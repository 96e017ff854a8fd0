"""Image datasets as batched `mindspore.dataset` pipelines of float32 (B, C, H, W) images in [-1, 1].

Every pipeline has the column "image", and with `labels=True` also "label" (int32 class indices, see
`class_names`). Per image:

    read  ->  resize (shorter side to image_size)  ->  centre crop image_size x image_size
          ->  1 or 3 channels  ->  random horizontal flip (optional)  ->  (x - 127.5) / 127.5  ->  HWC -> CHW
          ->  batch

Everything after "read" is MindSpore's C++ operations, run per image by `num_parallel_workers` threads outside
the GIL; MNIST, Fashion-MNIST and CIFAR-10 are also read in C++. Folders of images are decoded and resized with
PIL in Python (`load_image`), in worker processes when num_parallel_workers > 1: two threads serialise on the
GIL and ran 3-4x slower than one (`scripts/data_throughput.py`); a process costs about a third more CPU per
image than the in-process thread (passing images back through shared memory), so processes pay off where
cores are spare, which is why `default_workers()` leaves one core to the training loop.

Choices and why:
    * [-1, 1] scaling: Ho et al. 2020 (DDPM), Sec. 3.3: "We assume that image data consists of integers in
      {0, 1, ..., 255} scaled linearly to [-1, 1]", which is the range the reverse process starts from (x_T ~ N(0, I))
      and that `GaussianDiffusion(clip_denoised=True)` clips to. The scaling is MindSpore's
      Normalize(mean=127.5, std=127.5): (x - 127.5) / 127.5, in which x - 127.5 is exact in float32, so each
      value is the float32 nearest to the exact one and 0 and 255 map to exactly -1 and 1. Rescale(1 / 127.5, -1)
      was rejected: it gives 1.0000001 for 255, because 1 / 127.5 is not exact in float32. `to_model_input` is
      the same mapping in NumPy, bit for bit, for arrays read outside a pipeline.
    * Random horizontal flip is the only augmentation DDPM used (on CIFAR-10, Appendix B); it is off by default
      because it is wrong for digits and text.
    * Resizing: the fixed-size datasets (MNIST, Fashion-MNIST 28x28, CIFAR-10 32x32) are left untouched at their
      native size, shrunk with OpenCV's INTER_AREA (pixel-area averaging, no aliasing) or enlarged bicubically.
      Folders of images follow guided-diffusion's `center_crop_arr` (Dhariwal & Nichol 2021): halve with a box
      filter while the shorter side is at least twice the target, then bicubic resize and a centre crop.
    * RGB -> grayscale is ITU-R 601-2 luma, L = 0.299 R + 0.587 G + 0.114 B: PIL's convert("L") for folders,
      OpenCV's RGB2GRAY for CIFAR-10 (its fixed-point rounding puts a few pixels one level away from PIL's).
      Grayscale -> RGB copies the channel.

Shuffling and sharding use one `DistributedSampler` (num_shards = 1 without data parallelism). Its permutation is
seeded and drawn over the whole dataset before it is split, so every rank must use the same seed to get disjoint
shards; the default, MindSpore's global dataset seed (5489 unless `ms.set_seed` / `ms.dataset.config.set_seed`
changed it), is the same on every rank. The permutation changes every epoch of an iterator, deterministically for
a given seed, so a run is reproducible epoch by epoch. When the dataset size is not divisible by num_shards, every
shard gets ceil(N / num_shards) images, the short ones padded by repeating images, so all ranks run the same
number of steps.

Reading a pipeline:
    for (x,) in iterate(dataset):                                     # x: np.ndarray, float32, (B, C, H, W)
        loss = train_step(ms.Tensor(x))
    for x, y in iterate(create_dataset(..., labels=True)):            # y: int32, (B,)
        loss = train_step(ms.Tensor(x), ms.Tensor(y))
`iterate` ends the pipeline (and its worker processes) however the loop ends; MindSpore's own iterators
(`create_tuple_iterator`, `create_dict_iterator`) work too, but one left behind by an error can crash a later one
(see `iterate`).
The pipeline runs on the host, so it feeds a network the same way in PyNative and graph mode; `Model.train` can
take it directly (its only column becomes the network's only input).
"""
import os
import re

import mindspore as ms
import mindspore.dataset as ds
import numpy as np
from mindspore.dataset import transforms, vision
from PIL import Image

from ..utils import check_choice, check_int
from .embedded import embedded_mnist_root
from .fetch import download_dataset
from .formats import CIFAR10_ARCHIVE_FOLDER, FILES, NATIVE_IMAGE_SIZE, SPLITS, file_problems

DATASETS = ("mnist", "fashion_mnist", "cifar10", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

CLASS_NAMES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    # Xiao, Rasul & Vollgraf 2017, Table 1
    "fashion_mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
    # batches.meta.txt of cifar-10-binary.tar.gz
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
_TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10 (binary version)"}
# Channels as stored on disk; for "folder" the reader converts to the requested number itself.
_STORED_CHANNELS = {"mnist": 1, "fashion_mnist": 1, "cifar10": 3}
_DEFAULT_CHANNELS = {"mnist": 1, "fashion_mnist": 1, "cifar10": 3, "folder": 3}
# DistributedSampler adds 1 to its seed each time a pipeline starts and hands it to C++ as a uint32.
_MAX_SEED = 2**31


def _check_shards(num_shards, shard_id):
    """(num_shards, shard_id), (1, 0) when both are None; a ValueError when only one is given or out of range."""
    if num_shards is None and shard_id is None:
        return 1, 0
    if num_shards is None or shard_id is None:
        raise ValueError(
            f"give both num_shards and shard_id (e.g. the device count and this device's rank) or neither, "
            f"got num_shards={num_shards!r}, shard_id={shard_id!r}"
        )
    num_shards = check_int("num_shards", num_shards, 1)
    return num_shards, check_int("shard_id", shard_id, 0, num_shards)


def _missing_data_error(name, root, split, problems):
    """The error to raise when the files of `split` are missing or malformed, naming the files and the fix."""
    title = _TITLES[name]
    needed = ", ".join(FILES[name][split])
    if not os.path.isdir(root):
        return FileNotFoundError(
            f"{title} not found: folder {root!r} does not exist. Pass download=True to fetch it, or set root to the "
            f"folder holding the unpacked {split} files ({needed})."
        )
    missing = [message for kind, message in problems if kind == "missing"]
    if missing:
        return FileNotFoundError(
            f"{title} {split} split not found in {root!r}: missing {', '.join(missing)}. Expected the unpacked files "
            f"{needed} in that folder; pass download=True to fetch them, or give the right path."
        )
    invalid = "; ".join(message for kind, message in problems if kind == "invalid")
    return ValueError(
        f"{title} files in {root!r} are not in the expected format: {invalid}. Delete them and pass download=True "
        f"to fetch fresh copies, or give the right path."
    )


def _resolve_root(name, root):
    """`root` as a str; for root=None the MNIST digits the package carries (see ms_ddpm/data/mnist5k/README.md) for
    "mnist", while the other data sets have no default folder, which is a ValueError saying what to set."""
    if root is not None:
        return os.fspath(root)
    if name == "mnist":
        return embedded_mnist_root()
    if name == "folder":
        raise ValueError("no root given for dataset 'folder': set root (data.root) to a folder of images")
    raise ValueError(
        f"no root given for {_TITLES[name]}: set root (data.root) to the folder holding its files, or to the folder "
        f"to fetch them into with download=True (data.download: true)"
    )


def _resolve_cifar10_root(root, split):
    """`root`, or root/cifar-10-batches-bin when root is the folder the official archive was extracted in."""
    nested = os.path.join(root, CIFAR10_ARCHIVE_FOLDER)
    if os.path.isdir(nested) and file_problems("cifar10", root, (split,)):
        if not file_problems("cifar10", nested, (split,)):
            return nested
    return root


class ImageReadError(ValueError):
    """An image file of a folder dataset that cannot be decoded; the message names the file."""


def pipeline_error(err):
    """The ImageReadError behind `err`, or None.

    An exception raised by a pipeline's Python source reaches the loop that iterates the pipeline as a
    RuntimeError from MindSpore's C++ engine whose message holds the source's traceback as text (the original
    exception is not chained), so a user-facing error is recovered from that text: the last line that
    ImageReadError wrote.
    """
    found = re.findall(r"ImageReadError: (cannot read image .*)", str(err))
    return ImageReadError(found[-1]) if found else None


def iterate(dataset):
    """The batches of one epoch of a pipeline, as tuples of NumPy arrays, with the pipeline ended when the loop ends.

    Use this instead of looping over `dataset.create_tuple_iterator()` directly. An iterator left to end by itself
    (after an error, or a loop left early) lives on in a reference cycle (an error's traceback holds the frame that
    holds it) until Python's cyclic garbage collector frees it, at a moment nobody chooses: if that moment falls in
    a dataset worker process forked from this one later, the child tears down its copy of the parent's C++ pipeline
    and crashes, and MindSpore's watchdog then terminates this process with SIGTERM ("Dataset worker process ... was
    killed by signal: Segmentation fault. Main process will be terminated"). Stopping the iterator here ends the
    pipeline and its worker processes at once, in this process, however the loop ends.
    """
    iterator = dataset.create_tuple_iterator(output_numpy=True, num_epochs=1)
    try:
        yield from iterator
    finally:
        iterator.stop()


def list_images(root):
    """Sorted paths of the files under `root` (recursively) whose extension is one of IMAGE_EXTENSIONS."""
    paths = []
    for folder, _, names in os.walk(root):
        paths.extend(os.path.join(folder, n) for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    return sorted(paths)


def load_image(path, image_size, channels):
    """One image file as uint8 (image_size, image_size, channels): converted, resized and centre-cropped.

    Follows guided-diffusion's `center_crop_arr`: box-filter halvings while the shorter side is >= 2 * image_size
    (cheap and alias-free), then one bicubic resize of the shorter side to image_size, then a centre crop.
    """
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as err:  # PIL raises several types for unreadable files
        raise ImageReadError(f"cannot read image {path!r}: {err}; delete or replace that file") from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit grayscale (e.g. some PNGs): convert("L") would clip at 255 instead of rescaling.
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) / 257.0 + 0.5, 0, 255).astype(np.uint8))
    img = img.convert("L" if channels == 1 else "RGB")
    while min(img.size) >= 2 * image_size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = image_size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    arr = arr[top : top + image_size, left : left + image_size]
    return np.ascontiguousarray(arr.reshape(image_size, image_size, channels))


def _top_folder(root, path):
    """The first path component of `path` below `root`: its class sub-folder, or its own name if it lies in root."""
    return os.path.relpath(path, root).split(os.sep)[0]


def _folder_classes(root, paths):
    """Sorted names of the immediate sub-folders of `root` that hold at least one of `paths` (at any depth)."""
    return sorted({top for top in (_top_folder(root, p) for p in paths) if os.path.isdir(os.path.join(root, top))})


def class_names(name, root=None):
    """The class names of dataset `name` in label order: label i of a batch is class_names(name, root)[i].

    MNIST: the digits "0" .. "9". Fashion-MNIST: Zalando's ten article names (Xiao, Rasul & Vollgraf 2017, Table 1).
    CIFAR-10: the ten names of the binary version's batches.meta.txt. These three ignore `root`. "folder": the
    sorted names of the sub-folders of `root` that hold images (the first path component below root, as
    torchvision's ImageFolder); images lying directly in root belong to no class, so a folder without class
    sub-folders gives [].
    """
    check_choice("dataset", name, DATASETS)
    if name != "folder":
        return list(CLASS_NAMES[name])
    root = _resolve_root(name, root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist; give the path to a folder of images")
    return _folder_classes(root, list_images(root))


def _folder_labels(root, paths):
    """int32 class index of each path (its sub-folder's position in class_names), or a ValueError saying why the
    folder cannot give labels."""
    classes = _folder_classes(root, paths)
    if len(classes) < 2:
        raise ValueError(
            f"image folder {root!r} has {len(classes)} class sub-folder(s) {classes}; labels need at least 2: put "
            f"each class's images in its own sub-folder (root/<class name>/...), or train without labels"
        )
    index = {c: i for i, c in enumerate(classes)}
    tops = [_top_folder(root, path) for path in paths]
    loose = [path for path, top in zip(paths, tops) if top not in index]
    if loose:
        raise ValueError(
            f"{len(loose)} image(s) lie directly in {root!r}, outside the class sub-folders {classes} (e.g. "
            f"{loose[0]!r}): move them into a class sub-folder, or train without labels"
        )
    return np.array([index[top] for top in tops], np.int32)


class ImageFiles:
    """Random-access source for `GeneratorDataset`: item i is (load_image(paths[i]),), uint8 (H, W, C), or
    (image, labels[i]) when labels (int32 class indices, one per path) are given."""

    def __init__(self, paths, image_size, channels, labels=None):
        self.paths = list(paths)
        self.image_size = image_size
        self.channels = channels
        self.labels = labels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        index = int(index)
        image = load_image(self.paths[index], self.image_size, self.channels)
        return (image,) if self.labels is None else (image, self.labels[index])


def to_model_input(images):
    """uint8 (B, H, W, C) or (B, H, W) -> float32 (B, C, H, W) in [-1, 1]: (x - 127.5) / 127.5 (Ho et al. Sec. 3.3),
    the pipelines' Normalize(127.5, 127.5) in NumPy, bit for bit."""
    if images.ndim == 3:
        images = images[..., None]
    half = np.float32(127.5)
    return (np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) - half) / half


def default_workers():
    """Dataset workers when none are asked for: the cores this process may run on (the launcher's binding, e.g.
    msrun --bind_core) but one, left to the training loop's host thread; at least 1, at most 8 (mindcv's and
    MindSpore's default)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, usable - 1))


def _sampler(num_shards, shard_id, shuffle, seed):
    """The sampler of every pipeline here: shard `shard_id` of `num_shards` (None: one shard), shuffled with `seed`."""
    sampler = ds.DistributedSampler(num_shards, shard_id, shuffle=bool(shuffle))
    if seed is not None:
        # The sampler copies the global dataset seed when it is built and uses `self.seed` when the pipeline
        # starts, so overriding the attribute seeds this pipeline alone (ms.dataset.config.set_seed would also
        # reseed Python's and NumPy's global generators).
        sampler.seed = check_int("seed", seed, 0, _MAX_SEED)
    return sampler


def create_array_dataset(arrays, columns, batch_size, shuffle=True, seed=None, num_shards=None, shard_id=None):
    """A batched pipeline over in-memory arrays (e.g. a latent cache, `ms_ddpm.latent`), columns `columns`, with
    `create_dataset`'s sampler: the same shuffle, shards and seed give the same order of the same N indices.
    The last incomplete batch is dropped; `num_images` is set as by `create_dataset`."""
    batch_size = check_int("batch_size", batch_size, 1)
    num_shards, shard_id = _check_shards(num_shards, shard_id)
    dataset = ds.NumpySlicesDataset(tuple(arrays), column_names=list(columns),
                                    sampler=_sampler(num_shards, shard_id, shuffle, seed))
    num_images = dataset.get_dataset_size()
    if num_images < batch_size:
        raise ValueError(f"{num_images} cached examples per shard, fewer than batch_size={batch_size}: lower it")
    dataset = dataset.batch(batch_size, drop_remainder=True)
    dataset.num_images = num_images
    return dataset


def create_dataset(
    name,
    root=None,
    split="train",
    image_size=28,
    channels=None,
    batch_size=16,
    shuffle=True,
    random_flip=False,
    num_shards=None,
    shard_id=None,
    download=False,
    seed=None,
    num_parallel_workers=None,
    drop_remainder=True,
    labels=False,
):
    """A batched pipeline of images, float32 (batch_size, channels, image_size, image_size) in [-1, 1], and with
    `labels=True` their class labels, int32 (batch_size,).

    Args:
        name: one of DATASETS. "mnist" / "fashion_mnist": folder with the unpacked IDX files
            (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte);
            "cifar10": folder with the CIFAR-10 binary version's data_batch_1.bin .. data_batch_5.bin and
            test_batch.bin (or the folder holding the archive's cifar-10-batches-bin/); "folder": any folder of
            .png/.jpg/.jpeg/.bmp/.webp files, searched recursively, read in sorted path order (without labels,
            sub-folders are just more images; with labels, each sub-folder of root is a class, see `class_names`).
        root: the folder described above (str or path-like). None: for "mnist", the 4,000 train and 1,000 test
            digits the package carries (ms_ddpm/data/mnist5k/, unpacked once into a per-user cache folder, see
            ms_ddpm.data.embedded); the other data sets need a root.
        split: "train" or "test" (t10k-* for the IDX datasets, test_batch.bin for CIFAR-10). Ignored for "folder",
            which always reads the whole folder.
        image_size: output height and width: the shorter side is resized to it, then centre-cropped.
        channels: 1 or 3; None means 1 for mnist / fashion_mnist and 3 for cifar10 / folder. Other values convert
            (grayscale repeated to RGB, or RGB to ITU-R 601-2 luma).
        batch_size: images per batch.
        shuffle: shuffle the images, with a new order every epoch.
        random_flip: flip each image horizontally with probability 1/2. Its randomness comes from MindSpore's
            global dataset seed (`ms.dataset.config.set_seed`), not from `seed`.
        num_shards, shard_id: data parallelism: this pipeline reads shard `shard_id` of `num_shards` disjoint
            shards (e.g. the device count and the rank). Give both or neither; 0 <= shard_id < num_shards.
        download: fetch, verify and unpack the official files into root when they are missing or incomplete
            (mnist, fashion_mnist, cifar10 only, and a root must be given; see ms_ddpm.data.fetch).
        seed: seed of the shuffle permutations (a new one each epoch); the same seed gives the same orders on every
            run. None uses MindSpore's global dataset seed at call time. Must be the same on all shards.
        num_parallel_workers: workers for reading and per-image transforms; None: `default_workers()`, the
            usable cores but one, up to 8. More than the machine's cores are capped at its core count (MindSpore refuses
            them). Folders of images are decoded in that many Python processes when it is above 1 (see the
            module docstring); they pass images through shared memory (/dev/shm), which some containers keep
            small: if workers fail there, enlarge it (docker run --shm-size) or call
            `mindspore.dataset.config.set_enable_shared_mem(False)`.
        drop_remainder: drop the last incomplete batch, so every batch has batch_size images (what a compiled
            training step wants).
        labels: also give each image's class label (index into `class_names(name, root)`), as a second column
            "label". Shuffling, sharding, skipping and seeds are the same with and without labels: the same seed
            gives the same images in the same order.

    Returns:
        A `mindspore.dataset` pipeline with the column "image" (and "label" with labels=True); `get_dataset_size()` is the number of batches per epoch on this shard, and
        the extra attribute `num_images` the number of images this shard reads per epoch (before dropping the
        remainder). Read it with `iterate(dataset)` (tuples of NumPy arrays), see the module docstring.

    Raises:
        ValueError: unknown name, split or channels, bad sizes or shard ids, malformed dataset files, a shard
            with fewer than batch_size images while drop_remainder is set, or labels from a folder with fewer than
            two class sub-folders or with images outside them.
        FileNotFoundError: root or the split's files are missing (and download is False), or a folder without
            images.
        DownloadError: a download failed or did not match its checksum.
    """
    check_choice("dataset", name, DATASETS)
    check_choice("split", split, SPLITS)
    image_size = check_int("image_size", image_size, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    if num_parallel_workers is None:
        num_parallel_workers = default_workers()
    num_parallel_workers = min(check_int("num_parallel_workers", num_parallel_workers, 1), os.cpu_count() or 1)
    channels = _DEFAULT_CHANNELS[name] if channels is None else check_choice("channels", channels, (1, 3))
    num_shards, shard_id = _check_shards(num_shards, shard_id)
    columns = ["image", "label"] if labels else ["image"]

    sampler = _sampler(num_shards, shard_id, shuffle, seed)

    if download:
        if name == "folder":
            raise ValueError("download=True needs one of 'mnist', 'fashion_mnist', 'cifar10', not 'folder'")
        download_dataset(name, root)
    root = _resolve_root(name, root)

    if name == "folder":
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist; give the path to a folder of images")
        paths = list_images(root)
        if not paths:
            raise FileNotFoundError(
                f"no images found under {root!r} (searched recursively for {', '.join(IMAGE_EXTENSIONS)} files)"
            )
        dataset = ds.GeneratorDataset(
            ImageFiles(paths, image_size, channels, _folder_labels(root, paths) if labels else None),
            column_names=columns,
            sampler=sampler,
            num_parallel_workers=num_parallel_workers,
            python_multiprocessing=num_parallel_workers > 1,
        )
        ops = []
    else:
        if name == "cifar10":
            root = _resolve_cifar10_root(root, split)
        problems = file_problems(name, root, (split,))
        if problems:
            raise _missing_data_error(name, root, split, problems)
        reader = ds.Cifar10Dataset if name == "cifar10" else ds.MnistDataset
        dataset = reader(root, usage=split, sampler=sampler, num_parallel_workers=num_parallel_workers)
        dataset = dataset.project(columns)
        if labels:  # stored as uint32
            dataset = dataset.map(transforms.TypeCast(ms.int32), input_columns="label")
        height, width = NATIVE_IMAGE_SIZE[name]
        ops = []
        if (height, width) != (image_size, image_size):
            shrink = image_size < min(height, width)
            ops.append(vision.Resize(image_size, vision.Inter.AREA if shrink else vision.Inter.BICUBIC))
            ops.append(vision.CenterCrop(image_size))
        if (_STORED_CHANNELS[name], channels) == (1, 3):
            ops.append(vision.ConvertColor(vision.ConvertMode.COLOR_GRAY2RGB))
        elif (_STORED_CHANNELS[name], channels) == (3, 1):
            # OpenCV's RGB2GRAY drops the channel axis and no C++ operation adds one back: repeat the plane and
            # keep the first copy, (H, W, 1)
            ops += [vision.ConvertColor(vision.ConvertMode.COLOR_RGB2GRAY),
                    vision.ConvertColor(vision.ConvertMode.COLOR_GRAY2RGB), transforms.Slice(True, True, slice(0, 1))]
    if random_flip:
        ops.append(vision.RandomHorizontalFlip(0.5))
    ops += [vision.Normalize([127.5] * channels, [127.5] * channels), vision.HWC2CHW()]
    dataset = dataset.map(ops, input_columns="image", num_parallel_workers=num_parallel_workers)

    num_images = dataset.get_dataset_size()
    if drop_remainder and num_images < batch_size:
        raise ValueError(
            f"{name} {split} has {num_images} images per shard, fewer than batch_size={batch_size}: with "
            f"drop_remainder=True every batch would be dropped. Lower batch_size or pass drop_remainder=False."
        )
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder, num_parallel_workers=num_parallel_workers)
    dataset.num_images = num_images
    return dataset
