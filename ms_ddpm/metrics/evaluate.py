"""Evaluate a trained checkpoint: Frechet distance, kernel distance, bits/dim and sampling speed.

    result = evaluate("outputs/run/ckpt_00010000.ckpt", "ddim", steps=50, num=1000, batch_size=250,
                      feature_ckpt="classifier.ckpt", bpd_batches=1)
    result["fd"], result["kid"], result["bits_per_dim"], result["samples_per_s"]
    result["bits_per_dim_ode"]  # with bpd_ode_batches >= 1

What is measured, and how:
  * the model is rebuilt from the checkpoint alone (its stored config; the EMA weights "ema.<name>", or the raw
    weights when the run kept no EMA, which the result says);
  * `num` samples are drawn in batches of `batch_size` with the named sampler at `steps` steps; batch i uses seed
    `seed + i`, as `ms-ddpm sample`, so the same arguments give the same samples. Samples are clipped to [-1, 1] and
    rounded to the 8-bit grid, as if saved as PNGs, because the real images are 8-bit (clean-fid does the same);
  * samples/s is `num` over the wall time of drawing them. Before it, one batch is drawn untimed (graph
    compilation, kernel selection, allocator warm-up) and its time is reported as `warmup_s`; a smaller last batch
    gets one untimed sampling step too, so graph mode does not compile inside the timed loop;
  * FD (`frechet_distance` of the feature means and covariances) and KID (`kernel_distance`) against the whole
    test split of the checkpoint's data set, at the checkpoint's image size (the real images go through
    `create_dataset`, as in training). Features: the penultimate layer of the MNIST classifier of
    `features.py` when `feature_ckpt` is given, else raw pixels, which gives a "pixel-space FD, not comparable
    to FID". The real statistics are computed once per call (not cached across calls);
  * bits/dim: `calc_bpd_loop` (the DDPM variational bound) on the first `bpd_batches` test batches; each batch costs
    T network evaluations (T = the training chain length), so it is off by default;
  * ODE bits/dim: `ode_bpd` (the probability-flow ODE's density, Song et al. 2021, Sec. 4.3) on the first
    `bpd_ode_batches` test batches, uniformly dequantised, with the seed of the bound's batches; each batch costs up to
    2 (`bpd_ode_steps` - 1) network evaluations with a vector-Jacobian product each, so it is off by default too.

FD and KID depend on the sample count: FD's estimate is biased upwards, strongly so when `num` is below the feature
dimension (the sample covariance then has rank < D). Compare numbers only at equal `num`, feature extractor and
real split; `real_floor` gives the value two real sets of the same size reach, for scale.
"""
import os
import platform
import sys
import time
import warnings

import mindspore as ms
import numpy as np
from scipy import linalg
from tqdm.auto import tqdm

from ..data import create_dataset
from ..train.trainer import build_sampler, default_sampler, load_trained_model
from .features import load_feature_extractor
from .frechet import feature_statistics, frechet_distance, kernel_distance
from .likelihood import ODE_STEPS, calc_bpd_loop, ode_bpd

PIXEL_NOTE = "pixel-space FD, not comparable to FID"


def _log(message):
    print(message, file=sys.stderr, flush=True)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def real_images(cfg, data_root, split, batch_size, num=None, seed=None):
    """float32 images (N, C, H, W) in [-1, 1] of `split` at the config's size and channels: all of them in file
    order, or the first `num` of a permutation seeded with `seed`."""
    c = cfg.data
    root = c.root if data_root is None else data_root
    dataset = create_dataset(c.name, root, split, c.image_size, c.channels, batch_size, shuffle=num is not None,
                             seed=seed, drop_remainder=False)
    if num is not None and num > dataset.num_images:
        raise ValueError(f"num={num} is more than the {dataset.num_images} images of the {split} split")
    images = []
    for (x,) in dataset.create_tuple_iterator(output_numpy=True, num_epochs=1):
        images.append(x)
        if num is not None and sum(len(b) for b in images) >= num:
            break
    images = np.concatenate(images)
    return images if num is None else images[:num]


def to_8bit_grid(x):
    """Clip to [-1, 1] and round to the 256 levels of 8-bit images (what saving as PNG does)."""
    return (np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0).astype(np.float32)


def extract_features(images, extractor, batch_size):
    """(N, D) float64 features: the extractor's `features` in batches, or the flattened pixels when it is None."""
    if extractor is None:
        return images.reshape(len(images), -1).astype(np.float64)
    out = [extractor.features(ms.Tensor(images[s:s + batch_size])).asnumpy()
           for s in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float64)


def _feature_space(feature_ckpt, cfg):
    """(extractor or None, the extractor's kind ("mnist_classifier", "fid_inception_v3") or "pixels")."""
    if feature_ckpt is None:
        return None, "pixels"
    extractor = load_feature_extractor(feature_ckpt)
    if cfg.data.channels not in extractor.input_channels:
        raise ValueError(f"the feature extractor ({extractor.kind}) takes {list(extractor.input_channels)}-channel "
                         f"images, the model makes {cfg.data.channels}-channel ones")
    return extractor, extractor.kind


def _distances(fake, real, seed, pixels):
    """FD and KID between two (N, D) feature sets, with a warning when N < D makes FD mostly estimator bias."""
    if pixels:
        _log(f"NOTE: no feature extractor given (--features): {PIXEL_NOTE}")
    n, d = min(len(fake), len(real)), fake.shape[1]
    mu1, sigma1 = feature_statistics(fake)
    mu2, sigma2 = feature_statistics(real)
    if n <= d:
        _log(f"WARNING: {n} samples of {d}-dimensional features: the covariance is singular and FD is dominated "
             "by estimator bias; compare only at equal num, and use num of a few times the feature dimension")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        fd = frechet_distance(mu1, sigma1, mu2, sigma2)
    if n > d and any(issubclass(w.category, linalg.LinAlgWarning) for w in caught):  # scipy's, said in one line
        _log("NOTE: a feature covariance is singular (features constant over the set, e.g. blank border pixels); "
             "FD's matrix square root is less accurate")
    return fd, kernel_distance(fake, real, seed=seed)


def _mean_bpd(real_test, batches, batch_size, bpd_fn):
    """Mean of `bpd_fn(images, i)["total_bpd"]` over the first `batches` test batches: (mean, number of images)."""
    totals = []
    for i in range(batches):
        batch = real_test[i * batch_size:(i + 1) * batch_size]
        if len(batch) == 0:
            break
        totals.append(bpd_fn(ms.Tensor(batch), i)["total_bpd"])
    totals = np.concatenate(totals)
    return float(totals.mean()), len(totals)


def _check_common(num, batch_size, bpd_batches=0):
    _check_int("num", num, 2)  # a covariance needs two samples
    _check_int("batch_size", batch_size, 1)
    _check_int("bpd_batches", bpd_batches, 0)


def evaluate(ckpt, sampler=None, steps=None, num=1000, batch_size=250, seed=0, feature_ckpt=None, data_root=None,
             bpd_batches=0, bpd_ode_batches=0, bpd_ode_steps=ODE_STEPS, mode="graph", device="CPU", progress=True):
    """Sample from a checkpoint and measure it (see the module docstring).

    Args:
        ckpt: checkpoint written by `ms-ddpm train`.
        sampler: a sampler of the checkpoint's process (`build_sampler`); None: ddim for a DDPM, ald for an NCSN.
            DDIM runs with eta = 0.
        steps: sampling steps (None: the sampler's default, e.g. all training timesteps).
        num, batch_size, seed: samples drawn, per batch, and the seed of batch 0 (batch i: seed + i).
        feature_ckpt: feature-extractor checkpoint (scripts/train_classifier.py's MNIST classifier, or the FID
            Inception-v3 of scripts/convert_inception_weights.py); None: pixel space.
        data_root: folder of the real data (None: the checkpoint's data.root).
        bpd_batches: test batches of `batch_size` images for bits/dim; 0 skips it.
        bpd_ode_batches: test batches of `batch_size` images for the ODE bits/dim; 0 skips it.
        bpd_ode_steps: noise levels of the ODE solver (`ode_bpd`'s num_steps, >= 2).
        mode, device: MindSpore execution mode ("graph" / "pynative") and device.

    Returns:
        dict with fd, kid, bits_per_dim and bits_per_dim_ode (None when skipped), samples_per_s, sampling_s,
        warmup_s and the settings.
    """
    _check_common(num, batch_size, bpd_batches)
    _check_int("bpd_ode_batches", bpd_ode_batches, 0)
    _check_int("bpd_ode_steps", bpd_ode_steps, 2)
    if steps is not None:
        _check_int("steps", steps, 1)

    cfg, net, diffusion, step, weights = load_trained_model(ckpt, mode, device)
    ncsn = cfg.diffusion.process == "ncsn"
    if ncsn and bpd_batches:
        raise ValueError("bits/dim from the variational bound needs a DDPM chain; this checkpoint is an NCSN "
                         "(diffusion.process ncsn): drop bpd_batches")
    sampler = sampler or default_sampler(cfg)
    chain = build_sampler(cfg, sampler, diffusion)  # a sampler of the other process is refused here
    if steps is not None:  # else the sampler's default: every training timestep / noise level, or ald's 100 per level
        chain.set_timesteps(steps)
    extractor, space = _feature_space(feature_ckpt, cfg)
    real_test = real_images(cfg, data_root, "test", batch_size)  # checks the data before the long sampling
    c = cfg.data
    sizes = [min(batch_size, num - s) for s in range(0, num, batch_size)]

    def draw(i, n):
        return chain.sample(net, (n, c.channels, c.image_size, c.image_size), seed=seed + i, progress=progress)

    start = time.perf_counter()
    draw(0, sizes[0]).asnumpy()  # untimed: compiles the network and warms every kernel up
    if sizes[-1] != sizes[0]:  # the smaller last batch has a shape of its own: one step compiles it, untimed
        shape = (sizes[-1], c.channels, c.image_size, c.image_size)
        next(chain.sample_progressive(net, shape, seed=seed, progress=False)).prev_sample.asnumpy()
    warmup_s = time.perf_counter() - start

    samples = []
    start = time.perf_counter()
    for i, n in enumerate(tqdm(sizes, desc=f"sample {sampler}-{chain.num_inference_steps}",
                               disable=not progress, unit="batch")):
        samples.append(draw(i, n).asnumpy())  # asnumpy waits for the device, so the wall time is complete
    sampling_s = time.perf_counter() - start
    samples = to_8bit_grid(np.concatenate(samples))
    if not np.isfinite(samples).all():
        raise ValueError(f"the samples of {ckpt} are not finite")

    real_feats = extract_features(real_test, extractor, batch_size)
    fd, kid = _distances(extract_features(samples, extractor, batch_size), real_feats, seed, extractor is None)

    bpd, bpd_images = None, 0
    if bpd_batches:
        _log(f"bits/dim: {diffusion.num_timesteps} network evaluations per batch of {batch_size} test images "
             f"({bpd_batches} batch(es))")
        bpd, bpd_images = _mean_bpd(real_test, bpd_batches, batch_size, lambda x, i: calc_bpd_loop(
            diffusion, net, x, seed=seed + i, progress=progress))

    bpd_ode, bpd_ode_images = None, 0
    if bpd_ode_batches:
        _log(f"bits/dim (ODE): up to {2 * (bpd_ode_steps - 1)} network evaluations, each with a vector-Jacobian "
             f"product, per batch of {batch_size} test images ({bpd_ode_batches} batch(es))")
        bpd_ode, bpd_ode_images = _mean_bpd(real_test, bpd_ode_batches, batch_size, lambda x, i: ode_bpd(
            diffusion, net, x, num_steps=bpd_ode_steps, dequantize=True, seed=seed + i, progress=progress))

    return {
        "checkpoint": str(ckpt), "checkpoint_step": step, "weights": weights,
        "dataset": c.name, "image_size": c.image_size, "real_split": "test", "num_real": len(real_test),
        "sampler": sampler, "steps": chain.num_inference_steps, "network_evaluations_per_sample": len(chain.timesteps),
        "num": num, "batch_size": batch_size, "seed": seed, "mode": mode, "device": device,
        "features": space, "feature_checkpoint": None if feature_ckpt is None else str(feature_ckpt),
        "feature_dim": real_feats.shape[1], "note": PIXEL_NOTE if extractor is None else None,
        "fd": fd, "kid": kid, "bits_per_dim": bpd, "bpd_images": bpd_images,
        "bits_per_dim_ode": bpd_ode, "bpd_ode_images": bpd_ode_images, "bpd_ode_steps": bpd_ode_steps,
        "samples_per_s": num / sampling_s, "sampling_s": sampling_s, "warmup_s": warmup_s,
    }


def real_floor(ckpt, num=1000, batch_size=250, seed=0, feature_ckpt=None, data_root=None, mode="graph",
               device="CPU"):
    """FD and KID of `num` real train images (a seeded random subset) against the test split, at the checkpoint's
    data set and image size, in the same feature space as `evaluate`: the value a perfect model would reach at
    this `num`, for scale. No sampling. Returns a dict like `evaluate`'s."""
    _check_common(num, batch_size)
    cfg = load_trained_model(ckpt, mode, device)[0]
    extractor, space = _feature_space(feature_ckpt, cfg)
    real_test = real_images(cfg, data_root, "test", batch_size)
    real_train = real_images(cfg, data_root, "train", batch_size, num=num, seed=seed)
    real_feats = extract_features(real_test, extractor, batch_size)
    fd, kid = _distances(extract_features(real_train, extractor, batch_size), real_feats, seed, extractor is None)
    c = cfg.data
    return {
        "checkpoint": str(ckpt), "real_floor": True, "dataset": c.name, "image_size": c.image_size,
        "real_split": "test", "num_real": len(real_test), "compared_split": "train", "num": num,
        "batch_size": batch_size, "seed": seed, "mode": mode, "device": device, "features": space,
        "feature_checkpoint": None if feature_ckpt is None else str(feature_ckpt), "feature_dim": real_feats.shape[1],
        "note": PIXEL_NOTE if extractor is None else None, "fd": fd, "kid": kid,
    }


def machine_description():
    """CPU model, logical and usable cores, platform: the context a samples/s number needs."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable, "platform": platform.platform(),
            "mindspore": ms.__version__}


def format_report(result):
    """The result as lines of text, one measurement per line."""
    space = ("raw pixels" if result["features"] == "pixels" else f"{result['features']} features") + \
        f", {result['feature_dim']}-d"
    against = f"{result['num']} vs {result['num_real']} real {result['real_split']} images"
    if result.get("real_floor"):
        against = f"{result['num']} real {result['compared_split']} vs {result['num_real']} real test images"
    note = f"  [{result['note']}]" if result.get("note") else ""
    lines = [f"FD: {result['fd']:.4f} ({space}; {against}){note}",
             f"KID: {result['kid']:.6f} ({space})"]
    if not result.get("real_floor"):
        if result["bits_per_dim"] is not None:
            lines.append(f"bits/dim: {result['bits_per_dim']:.4f} ({result['bpd_images']} test images, "
                         "variational bound)")
        if result.get("bits_per_dim_ode") is not None:
            lines.append(f"bits/dim (ODE): {result['bits_per_dim_ode']:.4f} ({result['bpd_ode_images']} test images "
                         f"uniformly dequantised, probability-flow ODE on {result['bpd_ode_steps']} log-SNR levels, "
                         "Hutchinson trace)")
        lines.append(f"samples/s: {result['samples_per_s']:.3f} ({result['sampler']}, {result['steps']} steps, "
                     f"{result['network_evaluations_per_sample']} network calls per sample, batch "
                     f"{result['batch_size']}, {result['mode']} mode; warm-up/compile {result['warmup_s']:.1f} s "
                     "excluded)")
    m = result.get("machine")
    if m:
        lines.append(f"machine: {m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, "
                     f"{m['platform']}, MindSpore {m['mindspore']}")
    if result.get("command"):
        lines.append(f"command: {result['command']}")
    return lines
