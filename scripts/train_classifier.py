"""Train the MNIST classifier whose penultimate features `ms-ddpm evaluate --features` uses for FD / KID.

    python scripts/train_classifier.py --out classifier.ckpt [--data FOLDER] [--epochs 10] [--seed 0]

Trains `ms_ddpm.metrics.features.MNISTClassifier` on the train split (the 4,000 digits of mnist5k) with Adam, a
cosine learning rate and random shifts of up to 2 pixels, in graph mode (the step compiled with `ms.jit`), then
prints the accuracy on the test split (1,000 digits) and the wall time, sets the feature scale (1 / RMS of the
train digits' features, see ms_ddpm.metrics.features), and writes the checkpoint atomically (weights, constructor
arguments, test accuracy, seed and epochs). Images are scaled to [-1, 1] by the library's
`to_model_input`, as for the diffusion models. The IDX files are read with `mindspore.dataset.MnistDataset`
directly: the random shifts work on the uint8 images, before the scaling that `create_dataset` applies. Without
`--data` they are the 4,000 + 1,000 digits the package carries (`ms_ddpm.data.embedded`), as for the configs.

Exit status 2 with one line on stderr for a missing data folder or bad arguments.
"""
import argparse
import math
import sys
import time

import mindspore as ms
import mindspore.dataset as ds
import numpy as np
from mindspore import nn

from ms_ddpm.data.datasets import to_model_input
from ms_ddpm.data.embedded import embedded_mnist_root
from ms_ddpm.data.formats import file_problems
from ms_ddpm.metrics.features import MNISTClassifier, save_feature_extractor

BATCH_SIZE = 50  # divides 4,000: every step has one static shape, so the compiled step is built once
MAX_SHIFT = 2  # random translations of up to 2 pixels (LeCun et al. 1998's distortions, simplified)


def load_split(root, split, limit=None):
    """uint8 images (N, 28, 28, 1) and int32 labels (N,) of one MNIST split, in file order."""
    problems = file_problems("mnist", root, (split,))
    if problems:
        raise FileNotFoundError(f"MNIST {split} split unusable in {root!r}: "
                                + "; ".join(f"{kind} {message}" for kind, message in problems)
                                + "; --data must be the folder of the unpacked IDX files")
    reader = ds.MnistDataset(str(root), usage=split, shuffle=False, num_samples=limit)
    images, labels = [], []
    for image, label in reader.create_tuple_iterator(output_numpy=True, num_epochs=1):
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


def train(root, epochs=10, seed=0, lr=2e-3, train_images=None, log=print):
    """Train a classifier and calibrate its feature scale on the train images; returns (net, test accuracy,
    training seconds, test images)."""
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None,
                   help="folder with the unpacked MNIST IDX files (default: the digits the package carries)")
    p.add_argument("--out", default="classifier.ckpt", help="checkpoint to write")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=None,
                   help="use only the first N train images (for smoke tests; default: all)")
    args = p.parse_args(argv)
    try:
        if args.epochs < 1 or (args.train_images is not None and args.train_images < 1):
            raise ValueError("--epochs and --train-images must be >= 1")
        ms.set_context(mode=ms.GRAPH_MODE)
        root = embedded_mnist_root() if args.data is None else args.data
        net, acc, seconds, num_test = train(root, args.epochs, args.seed, train_images=args.train_images)
    except (FileNotFoundError, ValueError) as err:
        print(f"train_classifier: error: {err}", file=sys.stderr)
        return 2
    path = save_feature_extractor(net, args.out, {"test_accuracy": f"{acc:.4f}", "seed": args.seed,
                                                  "epochs": args.epochs})
    print(f"test accuracy {acc:.2%} on {num_test} test digits; training {seconds:.0f} s "
          f"({args.epochs} epochs, graph mode); wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
