"""Train the MNIST classifier whose penultimate features `ms-ddpm evaluate --features` uses for FD / KID.

    python scripts/train_classifier.py --out classifier.ckpt [--data FOLDER] [--epochs 10] [--seed 0]

A command line over `ms_ddpm.metrics.classifier_training.train_classifier` (see there what it trains and how): it
prints the accuracy on the test split (1,000 digits) and the wall time and writes the checkpoint atomically (weights,
constructor arguments, test accuracy, seed and epochs), in graph mode. Without `--data` it reads the 4,000 + 1,000
digits the package carries (`ms_ddpm.data.embedded`), as the configs do. (`ms-ddpm train` with `train.eval_every`
trains and caches such a classifier itself when no feature checkpoint is given.)

Exit status 2 with one line on stderr for a missing data folder or bad arguments.
"""
import argparse
import sys

import mindspore as ms

from ms_ddpm.data.embedded import embedded_mnist_root
from ms_ddpm.metrics.classifier_training import train_classifier
from ms_ddpm.metrics.features import save_feature_extractor


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
        net, acc, seconds, num_test = train_classifier(root, args.epochs, args.seed, train_images=args.train_images)
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
