"""Images per second that `create_dataset`'s pipelines deliver on this machine, read the way the trainer reads them.

    python scripts/data_throughput.py --dataset mnist --workers 1 2 --repeats 5
    python scripts/data_throughput.py --dataset folder --pngs 2000 --image-size 32 --channels 3 --workers 1 2

Each repeat builds a fresh pipeline (as `Trainer.batches` does every epoch) and iterates one epoch with
`create_tuple_iterator(output_numpy=True)`: it reports the seconds to the first batch (pipeline start, worker
processes included) and the images/s after it. `--host-work-ms M` spends M ms of pure-Python work on each batch
in the reading loop, holding the GIL as a training loop's host side does; a pipeline stage that needs the GIL
then competes with it (the figure to compare is images/s against 1000 * batch_size / M, the loop's own limit).
The worker counts take turns within each repeat (1 2 1 2 ...), so a machine busy with other work slows them
alike; medians are printed. `--pngs N` writes N RGB PNG files of `--png-size` pixels square, made from MNIST digits
(tinted, upscaled), into `--root` (a temporary folder without it) and reads that folder with dataset "folder".
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from ms_ddpm.data import create_dataset
from ms_ddpm.utils import machine_description


def write_pngs(folder, count, size):
    """`count` RGB PNGs of size x size pixels from the first MNIST digits the package carries."""
    digits = []
    for (x,) in create_dataset("mnist", None, batch_size=500, shuffle=False).create_tuple_iterator(
            output_numpy=True, num_epochs=1):
        digits.append(np.round((x[:, 0] + 1) * 127.5).astype(np.uint8))
        if sum(map(len, digits)) >= count:
            break
    digits = np.concatenate(digits)[:count]
    tints = np.random.default_rng(0).uniform(0.3, 1.0, (count, 3))
    for i, (digit, tint) in enumerate(zip(digits, tints)):
        rgb = (digit[..., None] * tint).astype(np.uint8)
        Image.fromarray(rgb).resize((size, size), Image.BICUBIC).save(os.path.join(folder, f"{i:05d}.png"))


def host_work(seconds):
    """Pure-Python work (it holds the GIL) for about `seconds`."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(100))


def measure(args, root, workers):
    """(seconds to the first batch, images/s after it) of one epoch of a fresh pipeline."""
    start = time.perf_counter()
    dataset = create_dataset(args.dataset, root, image_size=args.image_size, channels=args.channels,
                             batch_size=args.batch_size, seed=0, num_parallel_workers=workers)
    iterator = dataset.create_tuple_iterator(output_numpy=True, num_epochs=1)
    next(iterator)
    first = time.perf_counter()
    images = 0
    for (x,) in iterator:
        host_work(args.host_work_ms / 1000)
        images += len(x)
    return first - start, images / (time.perf_counter() - first)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist", choices=["mnist", "folder"])
    p.add_argument("--root", default=None, help="data folder (mnist: default the digits the package carries)")
    p.add_argument("--pngs", type=int, default=0, help="folder: first write this many PNGs into --root (default: a "
                   "temporary folder)")
    p.add_argument("--png-size", type=int, default=256, help="height and width of the PNGs --pngs writes")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="num_parallel_workers values to compare")
    p.add_argument("--host-work-ms", type=float, default=0.0, help="pure-Python work per batch in the reading loop")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root
        if args.dataset == "folder" and args.pngs:
            root = root or scratch
            os.makedirs(root, exist_ok=True)
            write_pngs(root, args.pngs, args.png_size)
        measure(args, root, args.workers[0])  # warm-up: imports, file cache, thread pools
        runs = {w: [] for w in args.workers}
        for _ in range(args.repeats):
            for w in args.workers:
                runs[w].append(measure(args, root, w))
    result = {"command": " ".join(sys.argv), "machine": machine_description(), "workers": {}}
    for w, r in runs.items():
        starts, rates = zip(*r)
        result["workers"][w] = {"first_batch_s": round(statistics.median(starts), 3),
                                "images_per_second": round(statistics.median(rates), 1),
                                "all_images_per_second": [round(x, 1) for x in rates]}
        print(f"{args.dataset} workers={w}: first batch after {statistics.median(starts):.2f} s, then "
              f"{statistics.median(rates):.0f} images/s (median of {len(rates)}; {min(rates):.0f}-{max(rates):.0f})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
