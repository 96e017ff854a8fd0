"""Training the MNIST classifier whose penultimate features are the feature space of FD / KID (`features.py`).

    net, accuracy, seconds, num_test = train_classifier(root, epochs=10)   # scripts/train_classifier.py's work
    path = cached_classifier("mnist", None)   # trained once per data set and its files, then reused

`train_classifier` trains `MNISTClassifier` on the train split with Adam, a cosine learning rate and random shifts of
up to 2 pixels (the step compiled with `ms.jit`), measures the accuracy on the test split and sets the feature scale
(1 / RMS of the train digits' features, see ms_ddpm.metrics.features). Images are scaled to [-1, 1] by the library's
`to_model_input`, as for the diffusion models. The IDX files are read with `mindspore.dataset.MnistDataset`
directly: the random shifts work on the uint8 images, before the scaling that `create_dataset` applies.

`cached_classifier` is what the trainer's FD evaluation (`train.eval_every`) uses when no feature checkpoint is
given: for an IDX data set (MNIST, Fashion-MNIST) it trains the classifier once, with `AUTO_TRAINING`, into the
per-user cache folder (`ms_ddpm.data.embedded.cache_folder`), under a name that carries a digest of the data files and
of the training settings, so other digits or other settings never reuse a stale classifier; later runs load it.
"""
import hashlib
import math
import os
import time

import mindspore as ms
import mindspore.dataset as ds
import numpy as np
from mindspore import nn

from ..data.datasets import iterate, to_model_input
from ..data.embedded import cache_folder, embedded_mnist_root
from ..data.formats import expected_files, file_problems
from .features import MNISTClassifier, save_feature_extractor

BATCH_SIZE = 50  # divides 4,000: every step has one static shape, so the compiled step is built once
MAX_SHIFT = 2  # random translations of up to 2 pixels (LeCun et al. 1998's distortions, simplified)
#: what `cached_classifier` trains with: scripts/train_classifier.py's defaults on at most the first 4,000 train
#: images (all of mnist5k; bounded, so the full 60,000-digit sets cost the same, about 2 minutes on 2 CPU cores)
AUTO_TRAINING = {"epochs": 10, "train_images": 4000, "seed": 0}
IDX_DATASETS = ("mnist", "fashion_mnist")  # the data sets of 28x28 grayscale IDX files the classifier trains on


def load_split(root, split, limit=None):
    """uint8 images (N, 28, 28, 1) and int32 labels (N,) of one split of an IDX data set, in file order."""
    problems = file_problems("mnist", root, (split,))
    if problems:
        raise FileNotFoundError(f"MNIST {split} split unusable in {os.fspath(root)!r}: "
                                + "; ".join(f"{kind} {message}" for kind, message in problems)
                                + "; the data folder must hold the unpacked IDX files")
    reader = ds.MnistDataset(os.fspath(root), usage=split, shuffle=False, num_samples=limit)
    images, labels = [], []
    for image, label in iterate(reader):
        images.append(image)
        labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int32)


def random_shift(images, rng):
    """Each image (N, H, W, C) moved by up to MAX_SHIFT pixels in x and y, the border filled with zeros."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT), (0, 0)))
    dy, dx = rng.integers(0, 2 * MAX_SHIFT + 1, (2, n))
    return np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def accuracy(net, images, labels, batch_size=250):
    """Share of uint8 `images` (N, H, W, C) that `net` assigns to their `labels` (N,)."""
    net.set_train(False)
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = net(ms.Tensor(to_model_input(images[start:start + batch_size]))).asnumpy()
        correct += int((logits.argmax(axis=1) == labels[start:start + batch_size]).sum())
    return correct / len(images)


def calibrate_feature_scale(net, images, batch_size=250):
    """Set net.feature_scale to 1 / RMS of the (unscaled) features of `images`, so that real digits have features
    of unit mean square per dimension, the scale KID's cubic kernel expects (see ms_ddpm.metrics.features)."""
    net.set_train(False)
    net.feature_scale.set_data(ms.Tensor(1.0, ms.float32))
    squares = [np.square(net.features(ms.Tensor(to_model_input(images[s:s + batch_size]))).asnumpy()).sum()
               for s in range(0, len(images), batch_size)]
    rms = float(np.sqrt(np.sum(squares) / (len(images) * net.feature_dim)))
    net.feature_scale.set_data(ms.Tensor(1.0 / rms, ms.float32))
    return 1.0 / rms


def train_classifier(root, epochs=10, seed=0, lr=2e-3, train_images=None, log=print):
    """Train a classifier on the IDX files in `root` and calibrate its feature scale on the train images.

    Args:
        root: folder of the unpacked IDX files (train-* and t10k-*).
        epochs, seed, lr: passes over the train images, the seed of weights and shifts, the peak learning rate.
        train_images: use only the first N train images (None: all).
        log: called with one line of progress per epoch.

    Returns:
        (net, test accuracy, training seconds, number of test images).
    """
    ms.set_seed(seed)
    x_train, y_train = load_split(root, "train", train_images)
    x_test, y_test = load_split(root, "test")
    batch = min(BATCH_SIZE, len(x_train))
    steps_per_epoch = len(x_train) // batch
    total = epochs * steps_per_epoch
    net = MNISTClassifier()
    lr_values = [lr * 0.5 * (1 + math.cos(math.pi * s / total)) for s in range(total)]
    optimizer = nn.Adam(net.trainable_params(), learning_rate=lr_values)
    loss_fn = nn.CrossEntropyLoss()

    def forward(x, y):
        return loss_fn(net(x), y)

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)

    @ms.jit
    def train_step(x, y):
        loss, grads = grad_fn(x, y)
        optimizer(grads)
        return loss

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        net.set_train(True)
        order = rng.permutation(len(x_train))
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            x = ms.Tensor(to_model_input(random_shift(x_train[idx], rng)))
            losses.append(float(train_step(x, ms.Tensor(y_train[idx])).asnumpy()))
        log(f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f} ({time.perf_counter() - start:.0f} s)")
    seconds = time.perf_counter() - start
    log(f"feature scale 1 / RMS = {calibrate_feature_scale(net, x_train):.4g}")
    return net, accuracy(net, x_test, y_test), seconds, len(x_test)


def cached_classifier(name, root, log=print):
    """The path of a classifier for IDX data set `name` ("mnist" / "fashion_mnist") in `root` (None: the digits the
    package carries), trained with AUTO_TRAINING on the first call and reused afterwards (see the module docstring).
    The checkpoint is written atomically, so a crash mid-write leaves no file that a later run would take."""
    if name not in IDX_DATASETS:
        raise ValueError(f"the feature classifier trains on IDX data sets (mnist, fashion_mnist), not {name!r}")
    root = embedded_mnist_root() if root is None and name == "mnist" else root
    if root is None:
        raise ValueError(f"no data.root for {name}: set it to the folder of its IDX files")
    digest = hashlib.sha256(repr(sorted(AUTO_TRAINING.items())).encode())
    for file_name in expected_files(name):
        path = os.path.join(root, file_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: data.root must hold the unpacked IDX files of {name}")
        with open(path, "rb") as f:
            digest.update(f.read())
    path = os.path.join(cache_folder(), "classifiers", f"mnist_classifier-{name}-{digest.hexdigest()[:16]}.ckpt")
    if os.path.isfile(path):
        log(f"FD features: the classifier cached at {path}")
        return path
    log(f"FD features: training the feature classifier on {name} ({AUTO_TRAINING['epochs']} epochs, at most "
        f"{AUTO_TRAINING['train_images']} train images), once for these files; cached at {path}")
    net, acc, seconds, num_test = train_classifier(root, AUTO_TRAINING["epochs"], AUTO_TRAINING["seed"],
                                                   train_images=AUTO_TRAINING["train_images"], log=log)
    save_feature_extractor(net, path, {"test_accuracy": f"{acc:.4f}", "seed": AUTO_TRAINING["seed"],
                                       "epochs": AUTO_TRAINING["epochs"]})
    log(f"FD features: test accuracy {acc:.2%} on {num_test} test images; training {seconds:.0f} s")
    return path
