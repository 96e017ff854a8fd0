import collections
import gzip
import hashlib
import http.server
import io
import os
import re
import struct
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import yaml
from mindspore import nn
from PIL import Image

from ms_ddpm.config import Config
from ms_ddpm.data import (DATASETS, ImageReadError, class_names, create_dataset, embedded, fetch, iterate,
                          pipeline_error)
from ms_ddpm.data.datasets import default_workers, to_model_input
from tests.helpers import MNIST5K

REPO = Path(__file__).resolve().parents[1]

CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def scaled(raw_uint8):
    """The documented mapping (x - 127.5) / 127.5, in float32."""
    return (raw_uint8.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)


def epoch(dataset, column="image"):
    """All images (or labels) of one epoch as one array: float32 (N, C, H, W), or int32 (N,)."""
    index = dataset.get_col_names().index(column)
    return np.concatenate([batch[index] for batch in iterate(dataset)])


def labelled_epoch(dataset):
    """(images, labels) of one epoch, read together from each batch."""
    rows = list(iterate(dataset))
    assert all(len(row) == 2 for row in rows)
    return np.concatenate([x for x, _ in rows]), np.concatenate([y for _, y in rows])


def read_idx_labels(path):
    return np.fromfile(path, dtype=np.uint8)[8:]


def read_idx_images(path):
    data = np.fromfile(path, dtype=np.uint8)
    n, rows, cols = struct.unpack(">III", data[4:16].tobytes())
    return data[16:].reshape(n, rows, cols)


def hashes(images):
    return [hashlib.md5(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images]


def idx_bytes(images=None, labels=None):
    """An IDX file in the MNIST layout: magic 2051 + (N, rows, cols), or magic 2049 + (N,), big-endian."""
    if images is not None:
        return struct.pack(">IIII", 2051, *images.shape) + images.astype(np.uint8).tobytes()
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def write_idx(folder, prefix, images):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images=images))
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels=np.arange(len(images)) % 10))


def cifar_records(rng, n):
    """n CIFAR-10 binary records: label byte, then 1,024 R, 1,024 G, 1,024 B bytes; and their (n, 32, 32, 3) pixels."""
    labels = rng.integers(0, 10, (n, 1), dtype=np.uint8)
    planes = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([labels, planes.reshape(n, -1)], axis=1)
    return records.tobytes(), planes.transpose(0, 2, 3, 1)


def write_cifar_file(path, records):
    """A full-size file: MindSpore's Cifar10Dataset reads exactly 10,000 records per file. The file is made sparse
    (truncate), so only the test's records take disk space; the other records are zeros."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(10000 * CIFAR_RECORD)
        f.write(records)


# ---------------------------------------------------------------------------------------------------- real MNIST


def test_mnist5k_batches_are_float32_nchw_in_minus_one_one():
    dataset = create_dataset("mnist", MNIST5K, batch_size=64, shuffle=False)
    assert dataset.get_dataset_size() == 4000 // 64
    assert dataset.num_images == 4000
    images = epoch(dataset)
    assert images.dtype == np.float32 and images.shape == (4000 // 64 * 64, 1, 28, 28)
    assert images.min() == -1.0 and images.max() == 1.0
    # shuffle=False keeps file order, so the batches are exactly the IDX pixels mapped by (x - 127.5) / 127.5
    raw = read_idx_images(MNIST5K / "train-images-idx3-ubyte")
    np.testing.assert_array_equal(images[:, 0], scaled(raw[: len(images)]))

    test = create_dataset("mnist", MNIST5K, split="test", batch_size=100, shuffle=False)
    assert test.num_images == 1000 and test.get_dataset_size() == 10
    keep_all = create_dataset("mnist", MNIST5K, batch_size=64, drop_remainder=False)
    assert keep_all.get_dataset_size() == 63 and len(epoch(keep_all)) == 4000


@pytest.mark.parametrize("size", [16, 32])
def test_mnist5k_resizes(size):
    raw = read_idx_images(MNIST5K / "train-images-idx3-ubyte")
    images = epoch(create_dataset("mnist", MNIST5K, image_size=size, batch_size=50, shuffle=False))
    assert images.shape == (4000, 1, size, size) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    # resizing keeps each digit's mean brightness (area averaging down, bicubic up)
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), scaled(raw).mean(axis=(1, 2)), atol=0.03)
    rgb = epoch(create_dataset("mnist", MNIST5K, image_size=size, channels=3, batch_size=50, shuffle=False))
    assert rgb.shape == (4000, 3, size, size)
    np.testing.assert_array_equal(rgb, np.repeat(images, 3, axis=1))


def test_mnist5k_shards_are_disjoint_and_cover_the_set():
    everything = hashes(epoch(create_dataset("mnist", MNIST5K, batch_size=40, shuffle=False)))
    assert len(set(everything)) == 4000  # no duplicate digits, so disjointness is meaningful
    shards = []
    for shard_id in range(2):
        dataset = create_dataset("mnist", MNIST5K, batch_size=40, num_shards=2, shard_id=shard_id, seed=11)
        assert dataset.num_images == 2000 and dataset.get_dataset_size() == 50
        shards.append(hashes(epoch(dataset)))
    assert len(shards[0]) == len(shards[1]) == 2000
    assert not set(shards[0]) & set(shards[1])
    assert collections.Counter(shards[0] + shards[1]) == collections.Counter(everything)


def test_mnist5k_seed_fixes_the_shuffle_order():
    def orders(seed, epochs=2):
        dataset = create_dataset("mnist", MNIST5K, batch_size=100, seed=seed)
        iterator = dataset.create_dict_iterator(output_numpy=True, num_epochs=epochs)
        return [hashes(np.concatenate([row["image"] for row in iterator])) for _ in range(epochs)]

    first, again, other = orders(5), orders(5), orders(6)
    assert first == again  # both epochs reproduce
    assert first[0] != other[0]
    assert first[0] != first[1]  # a new permutation every epoch
    assert sorted(first[0]) == sorted(other[0]) == sorted(first[1])
    unshuffled = hashes(epoch(create_dataset("mnist", MNIST5K, batch_size=100, shuffle=False)))
    assert first[0] != unshuffled


def test_mnist5k_random_flip_flips_some_images_and_keeps_their_pixels():
    plain = epoch(create_dataset("mnist", MNIST5K, batch_size=100, shuffle=False))
    flipped = epoch(create_dataset("mnist", MNIST5K, batch_size=100, shuffle=False, random_flip=True))
    same = (flipped == plain).all(axis=(1, 2, 3))
    mirrored = (flipped == plain[..., ::-1]).all(axis=(1, 2, 3))
    assert (same | mirrored).all()  # nothing but horizontal mirroring happens
    assert not (same & mirrored).any()  # no digit in the set is symmetric, so each one is classified once
    assert 0.4 < mirrored.mean() < 0.6  # probability 1/2 over 4,000 draws
    np.testing.assert_array_equal(np.sort(flipped.reshape(4000, -1), axis=1), np.sort(plain.reshape(4000, -1), axis=1))


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_batches_feed_a_network(mode):
    ms.set_context(mode=mode)
    net = nn.Conv2d(1, 4, 3, pad_mode="same")
    dataset = create_dataset("mnist", MNIST5K, batch_size=8)
    (x,) = next(dataset.create_tuple_iterator(num_epochs=1))
    assert isinstance(x, ms.Tensor) and x.dtype == ms.float32
    assert net(x).shape == (8, 4, 28, 28)


def test_mnist5k_labels_are_the_idx_labels_and_change_no_image():
    raw_labels = read_idx_labels(MNIST5K / "train-labels-idx1-ubyte")
    images, labels = labelled_epoch(create_dataset("mnist", MNIST5K, batch_size=64, shuffle=False, labels=True))
    assert labels.dtype == np.int32 and labels.shape == (4000 // 64 * 64,)
    np.testing.assert_array_equal(labels, raw_labels[: len(labels)])
    np.testing.assert_array_equal(images, epoch(create_dataset("mnist", MNIST5K, batch_size=64, shuffle=False)))
    assert class_names("mnist") == [str(d) for d in range(10)]

    # shuffled, sharded and skipped: the same images in the same order as without labels, each with its own label
    label_of = dict(zip(hashes(epoch(create_dataset("mnist", MNIST5K, batch_size=40, shuffle=False))), raw_labels))
    for shard_id in range(2):
        kwargs = dict(batch_size=40, num_shards=2, shard_id=shard_id, seed=7)
        plain = create_dataset("mnist", MNIST5K, **kwargs).skip(3)
        images, labels = labelled_epoch(create_dataset("mnist", MNIST5K, labels=True, **kwargs).skip(3))
        assert len(images) == 2000 - 3 * 40
        np.testing.assert_array_equal(images, epoch(plain))
        np.testing.assert_array_equal(labels, [label_of[h] for h in hashes(images)])


# ------------------------------------------------------------------------------------- the digits the package carries


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """A fresh per-user cache folder: $XDG_CACHE_HOME/ms_ddpm."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "ms_ddpm"


def test_quick_start_configs_read_the_carried_digits_which_are_mnist5k(user_cache):
    for config in ("unet_mnist5k_cpu.yaml", "ncsn_mnist5k_cpu.yaml"):
        data = Config.load(REPO / "configs" / config).data
        assert data.name == "mnist" and data.root is None and not data.download
    assert Config().data.root is None
    for split in ("train", "test"):
        kwargs = dict(split=split, image_size=data.image_size, channels=data.channels, batch_size=100, shuffle=False,
                      drop_remainder=False, labels=True)
        images, labels = labelled_epoch(create_dataset(data.name, data.root, **kwargs))
        assert len(images) == {"train": 4000, "test": 1000}[split]
        expected_images, expected_labels = labelled_epoch(create_dataset("mnist", MNIST5K, **kwargs))
        np.testing.assert_array_equal(images, expected_images)
        np.testing.assert_array_equal(labels, expected_labels)
    # unpacked once into the cache, byte for byte the IDX files of mnist5k (their SHA-256), no staging folder left
    mnist5k_sha256 = {
        "train-images-idx3-ubyte": "01c279c669c4632ea8b97298fee28d0f4c5fe2bf2039e7f822f3feaac779d017",
        "train-labels-idx1-ubyte": "daf1c61ba276c5ec7656a0a9c541c2f61cb96d7af3a019906cdb4cf08ef09728",
        "t10k-images-idx3-ubyte": "48e7795fc2f307cac39d091315c695780f904df73fef72545ee5b40d8e7948c3",
        "t10k-labels-idx1-ubyte": "9f9f83403fa89036e5960042fa3fdded854d1e4a5602fe4b476f8ff0e7865ff8",
    }
    (folder,) = user_cache.iterdir()
    assert folder.name.startswith("mnist5k-") and sorted(os.listdir(folder)) == sorted(IDX_FILES)
    for name in IDX_FILES:
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == mnist5k_sha256[name], name
    packed = sorted(p.name for p in (REPO / "ms_ddpm" / "data" / "mnist5k").iterdir())
    assert packed == sorted([f + ".gz" for f in IDX_FILES] + ["README.md"])


def test_carried_digits_unpack_once_and_a_damaged_copy_is_replaced(user_cache, monkeypatch):
    root = embedded.embedded_mnist_root()
    assert os.path.dirname(root) == str(user_cache) and os.listdir(user_cache) == [os.path.basename(root)]
    train = os.path.join(root, "train-images-idx3-ubyte")
    before = os.stat(train).st_mtime_ns
    assert embedded.embedded_mnist_root() == root and os.stat(train).st_mtime_ns == before  # not unpacked again
    with open(train, "r+b") as f:  # truncated: replaced as a whole on the next call
        f.truncate(1000)
    assert embedded.embedded_mnist_root() == root
    assert os.path.getsize(train) == 16 + 4000 * 28 * 28 and os.listdir(user_cache) == [os.path.basename(root)]
    images = epoch(create_dataset("mnist", split="test", batch_size=500, shuffle=False))
    assert images.shape == (1000, 1, 28, 28) and images.min() == -1.0 and images.max() == 1.0

    monkeypatch.setenv("XDG_CACHE_HOME", train)  # a file: no folder can be made below it
    with pytest.raises(ValueError, match=r"cannot unpack the MNIST digits .*set XDG_CACHE_HOME .*or data\.root"):
        create_dataset("mnist")


def test_root_none_is_an_error_for_the_other_data_sets():
    for name, title in (("fashion_mnist", "Fashion-MNIST"), ("cifar10", "CIFAR-10")):
        with pytest.raises(ValueError, match=rf"no root given for {title}.*data\.root.*data\.download: true"):
            create_dataset(name)
    with pytest.raises(ValueError, match=r"no root given for dataset 'folder': set root \(data\.root\)"):
        create_dataset("folder")
    with pytest.raises(ValueError, match=r"no root given for dataset 'folder'"):
        class_names("folder")
    with pytest.raises(ValueError, match=r"download=True \(data\.download\) needs root.*package carries"):
        create_dataset("mnist", download=True)
    with pytest.raises(ValueError, match=r"needs root \(data\.root\): the folder to fetch the full cifar10"):
        fetch.download_dataset("cifar10", None)


# ------------------------------------------------------------------------------------------- synthetic files


def test_fashion_mnist_idx_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    train[0, 0, 0], train[1, 0, 0] = 0, 255
    test = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    write_idx(tmp_path, "train", train)
    write_idx(tmp_path, "t10k", test)

    images = epoch(create_dataset("fashion_mnist", tmp_path, batch_size=12, shuffle=False))
    np.testing.assert_array_equal(images[:, 0], scaled(train))
    np.testing.assert_allclose(images[:, 0], train / 127.5 - 1, atol=1e-7)  # float64 reference
    assert images[0, 0, 0, 0] == -1.0 and images[1, 0, 0, 0] == 1.0
    test_images = epoch(create_dataset("fashion_mnist", tmp_path, split="test", batch_size=3, shuffle=False))
    np.testing.assert_array_equal(test_images[:, 0], scaled(test))
    _, test_labels = labelled_epoch(
        create_dataset("fashion_mnist", tmp_path, split="test", batch_size=3, shuffle=False, labels=True)
    )
    np.testing.assert_array_equal(test_labels, np.arange(6) % 10)  # write_idx's labels
    assert class_names("fashion_mnist") == [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
    ]
    rgb = epoch(create_dataset("fashion_mnist", tmp_path, split="test", batch_size=6, shuffle=False, channels=3))
    np.testing.assert_array_equal(rgb, np.repeat(scaled(test)[:, None], 3, axis=1))


def test_every_pixel_value_maps_to_the_nearest_float32_of_its_exact_scaling(tmp_path):
    """(x - 127.5) / 127.5 is exact before its one rounding: 0 -> -1 and 255 -> 1 exactly, and every value the
    float32 nearest to the exact one, on each path (MNIST IDX, grayscale to RGB, CIFAR-10 RGB to gray, a folder)."""
    values = np.resize(np.arange(256, dtype=np.uint8), (1, 28, 28))  # every value, some twice
    exact = ((values.astype(np.float64) - 127.5) / 127.5).astype(np.float32)
    assert exact.min() == -1.0 and exact.max() == 1.0
    np.testing.assert_array_equal(to_model_input(values[..., None])[0], exact)  # the NumPy twin, bit for bit
    write_idx(tmp_path / "idx", "train", values)
    gray = epoch(create_dataset("mnist", tmp_path / "idx", batch_size=1))
    np.testing.assert_array_equal(gray[0], exact)
    rgb = epoch(create_dataset("mnist", tmp_path / "idx", channels=3, batch_size=1))
    np.testing.assert_array_equal(rgb[0], np.repeat(exact, 3, axis=0))
    # a CIFAR-10 record whose three planes are equal: its luma is the plane itself, through RGB2GRAY and back
    plane = np.resize(np.arange(256, dtype=np.uint8), (32, 32))
    record = np.concatenate([[3], np.tile(plane.reshape(-1), 3)]).astype(np.uint8).tobytes()
    write_cifar_file(tmp_path / "cifar" / "test_batch.bin", record)
    luma = create_dataset("cifar10", tmp_path / "cifar", split="test", image_size=32, channels=1, batch_size=1,
                          shuffle=False)
    (first,) = next(luma.create_tuple_iterator(output_numpy=True, num_epochs=1))
    assert first.shape == (1, 1, 32, 32)
    np.testing.assert_array_equal(first[0, 0], ((plane.astype(np.float64) - 127.5) / 127.5).astype(np.float32))
    (tmp_path / "png").mkdir()
    Image.fromarray(values[0]).save(tmp_path / "png" / "ramp.png")
    folder = epoch(create_dataset("folder", tmp_path / "png", image_size=28, channels=1, batch_size=1))
    np.testing.assert_array_equal(folder[0], exact)


def test_worker_counts_default_to_the_usable_cores_and_are_capped():
    assert default_workers() == max(1, min(8, len(os.sched_getaffinity(0)) - 1))
    plain = epoch(create_dataset("mnist", MNIST5K, split="test", batch_size=100, shuffle=False, num_parallel_workers=1))
    for workers in (None, os.cpu_count() + 3):  # MindSpore itself refuses more workers than cores
        dataset = create_dataset("mnist", MNIST5K, split="test", batch_size=100, shuffle=False,
                                 num_parallel_workers=workers)
        np.testing.assert_array_equal(epoch(dataset), plain)


def test_cifar10_binary_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(1)
    records, pixels = cifar_records(rng, 8)
    # the layout `tar xzf cifar-10-binary.tar.gz` leaves: root/cifar-10-batches-bin/*.bin
    write_cifar_file(tmp_path / "cifar-10-batches-bin" / "test_batch.bin", records)

    dataset = create_dataset("cifar10", tmp_path, split="test", image_size=32, batch_size=8, shuffle=False)
    assert dataset.num_images == 10000
    (first,) = next(dataset.create_tuple_iterator(output_numpy=True, num_epochs=1))
    assert first.shape == (8, 3, 32, 32) and first.dtype == np.float32
    np.testing.assert_array_equal(first, scaled(pixels.transpose(0, 3, 1, 2)))
    labelled = create_dataset("cifar10", tmp_path, split="test", image_size=32, batch_size=8, shuffle=False, labels=True)
    images, labels = next(labelled.create_tuple_iterator(output_numpy=True, num_epochs=1))
    np.testing.assert_array_equal(images, first)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, np.frombuffer(records, np.uint8)[::CIFAR_RECORD])  # each record's first byte
    assert class_names("cifar10") == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"
    ]

    gray = create_dataset("cifar10", tmp_path, split="test", image_size=32, channels=1, batch_size=8, shuffle=False)
    (first,) = next(gray.create_tuple_iterator(output_numpy=True, num_epochs=1))
    # ITU-R 601-2 luma; OpenCV's fixed-point arithmetic rounds a few values one level off the exact formula
    luma = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(first[:, 0], luma / 127.5 - 1, atol=1 / 127.5 + 1e-6)
    assert np.mean(first[:, 0] == scaled(np.round(luma).astype(np.uint8))) > 0.99

    small = create_dataset("cifar10", tmp_path, split="test", image_size=16, batch_size=8, shuffle=False)
    (first,) = next(small.create_tuple_iterator(output_numpy=True, num_epochs=1))
    # INTER_AREA halving is the mean of each 2x2 block
    blocks = pixels.astype(np.float64).reshape(8, 16, 2, 16, 2, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(first, blocks / 127.5 - 1, atol=1 / 127.5 + 1e-6)


def test_cifar10_wrong_size_file_is_reported(tmp_path):
    write_cifar_file(tmp_path / "test_batch.bin", b"")
    with open(tmp_path / "test_batch.bin", "r+b") as f:
        f.truncate(5 * CIFAR_RECORD)
    with pytest.raises(ValueError, match=r"test_batch\.bin: 15365 bytes, expected 30730000.*download=True"):
        create_dataset("cifar10", tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match=r"missing data_batch_1\.bin, .*data_batch_5\.bin.*download=True"):
        create_dataset("cifar10", tmp_path, split="train")


def make_png_folder(root):
    """Images of several sizes and modes; returns the expected (3, 16, 16) image of each in sorted path order."""
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("not an image")
    red = np.zeros((30, 40, 3), np.uint8)
    red[..., 0] = 255
    Image.fromarray(red).save(root / "a_red.png")  # 40x30 RGB, resized and cropped
    stripes = np.zeros((16, 48, 3), np.uint8)
    stripes[:, :16, 0], stripes[:, 16:32, 1], stripes[:, 32:, 2] = 255, 255, 255
    Image.fromarray(stripes).save(root / "b_stripes.PNG")  # shorter side already 16: only the centre (green) is kept
    Image.fromarray(np.full((50, 20), 51, np.uint8), mode="L").save(root / "sub" / "c_gray.png")
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 2], rgba[..., 3] = 255, 128
    Image.fromarray(rgba, mode="RGBA").save(root / "sub" / "d_blue_rgba.png")  # 64 >= 2 * 16: box halvings first
    Image.fromarray(np.full((33, 33, 3), 200, np.uint8)).save(root / "e_light.bmp")
    # sorted paths: a_red.png, b_stripes.PNG, e_light.bmp, sub/c_gray.png, sub/d_blue_rgba.png
    colours = [(255, 0, 0), (0, 255, 0), (200, 200, 200), (51, 51, 51), (0, 0, 255)]
    return np.stack([np.broadcast_to(np.array(c, np.uint8)[:, None, None], (3, 16, 16)) for c in colours])


def test_folder_of_images_is_resized_cropped_and_converted(tmp_path):
    expected = make_png_folder(tmp_path)
    dataset = create_dataset("folder", tmp_path, image_size=16, batch_size=5, shuffle=False)
    assert dataset.num_images == 5
    images = epoch(dataset)
    assert images.shape == (5, 3, 16, 16) and images.dtype == np.float32
    np.testing.assert_array_equal(images, scaled(expected))  # constant colours survive resizing exactly

    gray = epoch(create_dataset("folder", tmp_path, image_size=8, channels=1, batch_size=5, shuffle=False))
    assert gray.shape == (5, 1, 8, 8)
    luma = [76, 150, 200, 51, 29]  # PIL convert("L") of the colours above (alpha ignored)
    np.testing.assert_array_equal(gray[:, 0, 0, 0], scaled(np.array(luma, np.uint8)))

    parallel = create_dataset(
        "folder", tmp_path, image_size=16, batch_size=2, shuffle=False, num_parallel_workers=2, drop_remainder=False
    )
    batches = [image for (image,) in iterate(parallel)]
    assert [len(b) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)

    # 5 images on 2 shards: 3 each, the short shard padded with a repeat, together covering every image
    shards = [
        epoch(create_dataset("folder", tmp_path, image_size=16, batch_size=3, num_shards=2, shard_id=i, seed=9))
        for i in range(2)
    ]
    assert [len(s) for s in shards] == [3, 3]
    assert set(hashes(np.concatenate(shards))) == set(hashes(images))


def test_folder_sub_folders_are_the_classes(tmp_path):
    make_png_folder(tmp_path / "loose")
    # no class sub-folders but "sub": fewer than two classes, and images outside them
    assert class_names("folder", tmp_path / "loose") == ["sub"]
    with pytest.raises(ValueError, match=r"has 1 class sub-folder\(s\) \['sub'\]; labels need at least 2"):
        create_dataset("folder", tmp_path / "loose", labels=True)
    (tmp_path / "one" / "cats").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "one" / "cats" / "c.png")
    with pytest.raises(ValueError, match=r"has 1 class sub-folder.*put each class's images in its own sub-folder"):
        create_dataset("folder", tmp_path / "one", labels=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "loose" / "sub2.png")
    (tmp_path / "loose" / "more").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "loose" / "more" / "m.png")
    with pytest.raises(ValueError, match=r"4 image\(s\) lie directly in .*outside the class sub-folders \['more', 'sub'\]"):
        create_dataset("folder", tmp_path / "loose", labels=True)
    (tmp_path / "no_images" / "inner").mkdir(parents=True)
    assert class_names("folder", tmp_path / "no_images") == []
    with pytest.raises(FileNotFoundError, match="image folder .* does not exist"):
        class_names("folder", tmp_path / "nope")

    # two classes; nested folders belong to their top sub-folder, folders without images are no class
    root = tmp_path / "classes"
    colours = {"zebra": [(10, 10, 10), (20, 20, 20)], "ant": [(30, 30, 30)], "bee": [(40, 40, 40), (50, 50, 50)]}
    for name, values in colours.items():
        for i, value in enumerate(values):
            folder = root / name / ("deep" if i else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(folder / f"{i}.png")
    (root / "empty" / "inner").mkdir(parents=True)
    (root / "ant" / "readme.txt").write_text("not an image")
    assert class_names("folder", root) == ["ant", "bee", "zebra"]
    images, labels = labelled_epoch(create_dataset("folder", root, image_size=8, batch_size=5, shuffle=False, labels=True))
    # sorted paths: ant/0, bee/0, bee/deep/1, zebra/0, zebra/deep/1
    np.testing.assert_array_equal(labels, [0, 1, 1, 2, 2])
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(images[:, 0, 0, 0], scaled(np.array([30, 40, 50, 10, 20], np.uint8)))
    kwargs = dict(image_size=8, batch_size=2, seed=3, num_shards=2, shard_id=1, num_parallel_workers=2)
    images, labels = labelled_epoch(create_dataset("folder", root, labels=True, **kwargs))
    np.testing.assert_array_equal(images, epoch(create_dataset("folder", root, **kwargs)))
    label_of = {30: 0, 40: 1, 50: 1, 10: 2, 20: 2}
    np.testing.assert_array_equal(labels, [label_of[v] for v in np.round((images[:, 0, 0, 0] + 1) * 127.5)])


def write_png_folder(root, count):
    """`count` plain 8x8 RGB PNGs of grey levels 0, 40, 80, ..."""
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / f"{i}.png")


def write_corrupt_folder(root):
    """Three good 8x8 PNGs and one file that ends after its PNG header: the pipeline fails at the first batch."""
    write_png_folder(root, 3)
    (root / "3_broken.png").write_bytes((root / "0.png").read_bytes()[:40])
    return root / "3_broken.png"


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_image_is_recovered_from_the_pipeline_error(tmp_path, workers):
    broken = write_corrupt_folder(tmp_path / "images")
    dataset = create_dataset("folder", tmp_path / "images", image_size=8, batch_size=4, num_parallel_workers=workers)
    with pytest.raises(RuntimeError) as err:  # what MindSpore's engine raises, with a traceback in the message
        epoch(dataset)
    assert "Traceback" in str(err.value)
    found = pipeline_error(err.value)
    assert isinstance(found, ImageReadError) and isinstance(found, ValueError)
    assert str(found).startswith(f"cannot read image {str(broken)!r}: ") and "\n" not in str(found)
    assert str(found).endswith("delete or replace that file")
    assert pipeline_error(RuntimeError("some other failure")) is None


# Failed pipelines, then new worker pools, in one process: the sequence that got the test process killed. The
# error kept alive (as pytest.raises keeps it) holds the failed iterator in a reference cycle; when the cyclic
# garbage collector happened to run in a dataset worker forked later, the worker tore down its copy of the parent's
# C++ pipeline, crashed, and MindSpore's watchdog terminated the parent. Reading through `iterate` ends every
# pipeline in the parent, whatever the loop's end. argv: the folder, and "iterate" or "raw" (the iterators left to
# the collector, which crashes within a few rounds).
FAILED_PIPELINES_THEN_NEW_POOLS = r"""
import gc, random, sys
from pathlib import Path
from ms_ddpm.data import create_dataset, iterate, pipeline_error
from tests.test_data import write_corrupt_folder, write_png_folder

def batches(dataset):
    if sys.argv[2] == "iterate":
        return iterate(dataset)
    return dataset.create_tuple_iterator(output_numpy=True, num_epochs=1)

def fail(workers):
    iterator = batches(create_dataset("folder", root / "bad", image_size=8, batch_size=4, num_parallel_workers=workers))
    try:
        [batch for batch in iterator]
    except RuntimeError as err:
        failure = err  # kept, as pytest.raises keeps it: a cycle through the traceback, this frame and the iterator
        assert pipeline_error(failure) is not None

root = Path(sys.argv[1])
write_corrupt_folder(root / "bad")
write_png_folder(root / "good", 5)
random.seed(0)
for round in range(6):
    for _ in range(2):
        good = create_dataset("folder", root / "good", image_size=8, batch_size=2, shuffle=False,
                              num_parallel_workers=2, drop_remainder=False)
        assert sum(len(images) for (images,) in batches(good)) == 5
    fail(1)
    if random.random() < 0.5:
        gc.collect()
    fail(2)
    if random.random() < 0.3:
        gc.collect()
print("alive")
"""


def test_failed_pipelines_do_not_get_the_process_killed_by_later_worker_pools(tmp_path):
    # in a subprocess, so that a kill fails this test instead of ending the test process
    proc = subprocess.run([sys.executable, "-c", FAILED_PIPELINES_THEN_NEW_POOLS, str(tmp_path), "iterate"],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert "Main process will be terminated" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", proc.stderr[-3000:]


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_image_ends_the_cli_with_one_line_and_status_2(tmp_path, workers):
    broken = write_corrupt_folder(tmp_path / "images")
    config = {
        "model": {"name": "unet", "kwargs": {"dim": 8, "dim_mults": [1, 2], "channels": 3, "heads": 1, "dim_head": 8}},
        "diffusion": {"num_timesteps": 10},
        "data": {"name": "folder", "root": str(tmp_path / "images"), "image_size": 8, "channels": 3,
                 "num_parallel_workers": workers},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "steps": 2, "warmup_steps": 0,
                  "sample_every": 0, "sample_steps": 5, "save_every": 2, "mode": "pynative"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "ms_ddpm.cli", "train", "--config", str(tmp_path / "config.yaml")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # stderr also holds the progress bar (drawn without a newline) and MindSpore's warnings
    stderr = re.sub(r"train: [^\r\n]*?\]", "", proc.stderr)
    lines = [line for line in re.split(r"[\r\n]+", stderr) if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, lines
    assert lines[0].startswith(f"ms-ddpm train: error: cannot read image {str(broken)!r}: "), lines
    assert lines[0].endswith("delete or replace that file"), lines


# ------------------------------------------------------------------------------------------------------ download


class _Server:
    """http.server on 127.0.0.1 (port 0) serving a folder in a thread, counting the requests it answers."""

    def __init__(self, folder):
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                server.requests += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.requests = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    (tmp_path / "www").mkdir()
    srv = _Server(tmp_path / "www")
    yield srv
    srv.close()


def publish_mnist(www, monkeypatch, rng):
    """gzip IDX archives under www/mnist/, registered as the 'mnist' mirror; returns the train images."""
    (www / "mnist").mkdir()
    train = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    files = {
        "train-images-idx3-ubyte.gz": idx_bytes(images=train),
        "train-labels-idx1-ubyte.gz": idx_bytes(labels=np.arange(10) % 10),
        "t10k-images-idx3-ubyte.gz": idx_bytes(images=train[:4]),
        "t10k-labels-idx1-ubyte.gz": idx_bytes(labels=np.arange(4)),
    }
    md5s = {}
    for name, data in files.items():
        packed = gzip.compress(data)
        (www / "mnist" / name).write_bytes(packed)
        md5s[name] = hashlib.md5(packed).hexdigest()
    monkeypatch.setitem(fetch.ARCHIVES, "mnist", md5s)
    return train


def test_download_mnist_from_a_local_mirror(tmp_path, server, monkeypatch):
    train = publish_mnist(tmp_path / "www", monkeypatch, np.random.default_rng(2))
    monkeypatch.setitem(fetch.MIRRORS, "mnist", server.url + "mnist")  # no trailing slash on purpose
    root = tmp_path / "data" / "mnist"
    images = epoch(create_dataset("mnist", root, batch_size=10, shuffle=False, download=True))
    np.testing.assert_array_equal(images[:, 0], scaled(train))
    assert sorted(os.listdir(root)) == sorted(IDX_FILES)  # unpacked, no archives or staging folder left
    fetched = server.requests
    assert fetched >= 4
    create_dataset("mnist", root, batch_size=10, download=True)  # complete: nothing is fetched again
    assert server.requests == fetched

    # a damaged file makes the folder incomplete: download=True replaces it, download=False explains
    (root / "t10k-images-idx3-ubyte").write_bytes(b"\x1f\x8b\x08 still gzipped")
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: .*magic number .*download=True"):
        create_dataset("mnist", root, split="test", batch_size=2)
    test = epoch(create_dataset("mnist", root, split="test", batch_size=4, shuffle=False, download=True))
    np.testing.assert_array_equal(test[:, 0], scaled(train[:4]))
    assert server.requests > fetched


def test_download_checksum_mismatch_leaves_nothing_behind(tmp_path, server, monkeypatch):
    publish_mnist(tmp_path / "www", monkeypatch, np.random.default_rng(3))
    monkeypatch.setitem(fetch.MIRRORS, "mnist", server.url + "mnist/")
    md5s = dict(fetch.ARCHIVES["mnist"])
    md5s["t10k-labels-idx1-ubyte.gz"] = "0" * 32  # the last archive: the first three were fine
    monkeypatch.setitem(fetch.ARCHIVES, "mnist", md5s)
    root = tmp_path / "mnist"
    with pytest.raises(fetch.DownloadError, match=r"MD5 mismatch for .*t10k-labels-idx1-ubyte\.gz: expected 0{32}"):
        create_dataset("mnist", root, download=True)
    assert os.listdir(root) == []
    with pytest.raises(FileNotFoundError, match="missing train-images-idx3-ubyte"):
        create_dataset("mnist", root)

    monkeypatch.setitem(fetch.MIRRORS, "mnist", server.url + "nowhere/")
    with pytest.raises(fetch.DownloadError, match=r"could not download .*nowhere/train-images-idx3-ubyte\.gz"):
        create_dataset("mnist", root, download=True)
    assert os.listdir(root) == []


def test_download_cifar10_binary_archive(tmp_path, server, monkeypatch):
    rng = np.random.default_rng(4)
    records, pixels = cifar_records(rng, 4)
    staging = tmp_path / "build" / "cifar-10-batches-bin"
    for name in CIFAR_FILES:
        write_cifar_file(staging / name, records if name == "test_batch.bin" else b"")
    (staging / "batches.meta.txt").write_text("airplane\n")
    (tmp_path / "www" / "kriz").mkdir()
    archive = tmp_path / "www" / "kriz" / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:  # mostly zeros: 184 MB packs to about 1 MB
        tar.add(staging, arcname="cifar-10-batches-bin")
    monkeypatch.setitem(fetch.MIRRORS, "cifar10", server.url + "kriz/")
    monkeypatch.setitem(fetch.ARCHIVES, "cifar10", {archive.name: hashlib.md5(archive.read_bytes()).hexdigest()})

    root = tmp_path / "cifar"
    dataset = create_dataset("cifar10", root, split="test", image_size=32, batch_size=4, shuffle=False, download=True)
    (first,) = next(dataset.create_tuple_iterator(output_numpy=True, num_epochs=1))
    np.testing.assert_array_equal(first, scaled(pixels.transpose(0, 3, 1, 2)))
    assert sorted(os.listdir(root)) == sorted(CIFAR_FILES + ["batches.meta.txt"])  # flat, archive removed


def test_download_refuses_archives_without_the_expected_files(tmp_path, server, monkeypatch):
    (tmp_path / "www" / "kriz").mkdir()
    archive = tmp_path / "www" / "kriz" / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    monkeypatch.setitem(fetch.MIRRORS, "cifar10", server.url + "kriz")
    monkeypatch.setitem(fetch.ARCHIVES, "cifar10", {archive.name: hashlib.md5(archive.read_bytes()).hexdigest()})
    root = tmp_path / "cifar"
    with pytest.raises(fetch.DownloadError, match=r"did not unpack to the expected files.*data_batch_1\.bin"):
        create_dataset("cifar10", root, download=True)
    assert os.listdir(root) == []


# --------------------------------------------------------------------------------------------------- bad input


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"dataset must be one of \['mnist', 'fashion_mnist', 'cifar10', 'folder'\]"):
        create_dataset("imagenet", "anywhere")
    assert DATASETS == ("mnist", "fashion_mnist", "cifar10", "folder")


def test_missing_root_says_how_to_fix_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        create_dataset("mnist", tmp_path / "nope")
    message = str(err.value)
    assert "does not exist" in message and "download=True" in message
    assert "train-images-idx3-ubyte" in message and "train-labels-idx1-ubyte" in message
    with pytest.raises(FileNotFoundError, match=r"missing t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"):
        create_dataset("fashion_mnist", tmp_path, split="test")
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10.*does not exist.*download=True.*test_batch\.bin"):
        create_dataset("cifar10", tmp_path / "nope", split="test")
    with pytest.raises(FileNotFoundError, match="image folder .* does not exist"):
        create_dataset("folder", tmp_path / "nope")


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("no pictures here")
    with pytest.raises(FileNotFoundError, match=r"no images found under .*\.png, \.jpg"):
        create_dataset("folder", tmp_path)
    with pytest.raises(ValueError, match="download=True needs one of"):
        create_dataset("folder", tmp_path, download=True)


def test_bad_arguments_are_rejected_before_reading(tmp_path):
    write_idx(tmp_path, "train", np.zeros((3, 28, 28), np.uint8))
    for size in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"image_size must be an integer >= 1"):
            create_dataset("mnist", tmp_path, image_size=size)
    with pytest.raises(ValueError, match=r"channels must be one of \[1, 3\], got 2"):
        create_dataset("mnist", tmp_path, channels=2)
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'test'\]"):
        create_dataset("mnist", tmp_path, split="val")
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1"):
        create_dataset("mnist", tmp_path, batch_size=0)
    with pytest.raises(ValueError, match=r"shard_id must be an integer in \[0, 2\), got 2"):
        create_dataset("mnist", tmp_path, batch_size=1, num_shards=2, shard_id=2)
    with pytest.raises(ValueError, match=r"shard_id must be an integer in \[0, 2\), got -1"):
        create_dataset("mnist", tmp_path, batch_size=1, num_shards=2, shard_id=-1)
    with pytest.raises(ValueError, match="give both num_shards and shard_id"):
        create_dataset("mnist", tmp_path, batch_size=1, num_shards=2)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2147483648\)"):
        create_dataset("mnist", tmp_path, batch_size=1, seed=-3)
    with pytest.raises(ValueError, match=r"3 images per shard, fewer than batch_size=4.*drop_remainder=False"):
        create_dataset("mnist", tmp_path, batch_size=4)
    assert len(epoch(create_dataset("mnist", tmp_path, batch_size=4, drop_remainder=False))) == 3


def test_mismatched_idx_files_are_reported(tmp_path):
    write_idx(tmp_path, "train", np.zeros((3, 28, 28), np.uint8))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels=np.arange(4)))
    with pytest.raises(ValueError, match="train split has 3 images but 4 labels"):
        create_dataset("mnist", tmp_path, batch_size=1)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images=np.zeros((3, 28, 28), np.uint8))[:-5])
    with pytest.raises(ValueError, match=r"idx3-ubyte: 2363 bytes, but its header \(3, 28, 28\) needs 2368"):
        create_dataset("mnist", tmp_path, batch_size=1)
    write_idx(tmp_path, "train", np.zeros((3, 16, 16), np.uint8))  # MnistDataset would fail at the first batch
    with pytest.raises(ValueError, match=r"16x16 images, but MindSpore's MnistDataset reads 28x28 ones only"):
        create_dataset("mnist", tmp_path, batch_size=1)
