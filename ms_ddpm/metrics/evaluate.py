"""Evaluate a trained checkpoint: Frechet distance, kernel distance, bits/dim and sampling speed.

    result = evaluate("outputs/run/ckpt_00010000.ckpt", "ddim", steps=50, num=1000, batch_size=250,
                      feature_ckpt="classifier.ckpt", bpd_batches=1)
    result["fd"], result["kid"], result["bits_per_dim"], result["samples_per_s"]
    result["bits_per_dim_ode"]  # with bpd_ode_batches >= 1
    result["class_accuracy"]    # a class-conditional model measured with the MNIST classifier
    result["confident"]         # any MNIST model measured with the MNIST classifier

What is measured, and how:
  * the model is rebuilt from the checkpoint alone (`DiffusionPipeline.from_checkpoint`: its stored config; the EMA
    weights "ema.<name>", or the raw weights when the run kept no EMA, which the result says);
  * `num` samples are drawn by the pipeline in batches of `batch_size` with the named sampler at `steps` steps;
    batch i uses seed `seed + i`, as `ms-ddpm sample`, so the same arguments give the same samples. A
    class-conditional model draws every class equally often (labels 0, 1, ..., C - 1, 0, ...), at `guidance_scale`
    (classifier-free guidance; 1: none). Samples are clipped to [-1, 1] and rounded to the 8-bit grid, as if saved
    as PNGs, because the real images are 8-bit (clean-fid does the same);
  * class accuracy (class-conditional models, with the MNIST classifier as feature extractor and as many classes
    as the model): the share of samples the classifier assigns to the class they were drawn for;
  * confident share (with the MNIST classifier as feature extractor): the share of samples whose most likely class
    has a softmax probability above 0.9, conditional or not: a count of recognisable digits;
  * samples/s is `num` over the wall time of drawing them. Before it, one batch is drawn untimed (graph
    compilation, kernel selection, allocator warm-up) and its time is reported as `warmup_s`; a smaller last batch
    gets one untimed sampling step too, so graph mode does not compile inside the timed loop;
  * FD (`frechet_distance` of the feature means and covariances) and KID (`kernel_distance`) against the whole
    test split of the checkpoint's data set, at the checkpoint's image size (the real images go through
    `create_dataset`, as in training). Features: the penultimate layer of the MNIST classifier of
    `features.py` when `feature_ckpt` is given, else raw pixels, which gives a "pixel-space FD, not comparable
    to FID". The real statistics are computed once per call (not cached across calls);
  * bits/dim: `calc_bpd_loop` (the DDPM variational bound) on the first `bpd_batches` test batches; each batch costs
    T network evaluations (T = the training chain length), so it is off by default. A class-conditional model is
    given each test image's label: the bound on log p(x | class);
  * ODE bits/dim: `ode_bpd` (the probability-flow ODE's density, Song et al. 2021, Sec. 4.3) on the first
    `bpd_ode_batches` test batches, uniformly dequantised, with the seed of the bound's batches; each batch costs up to
    2 (`bpd_ode_steps` - 1) network evaluations with a vector-Jacobian product each, so it is off by default too.

FD and KID depend on the sample count: FD's estimate is biased upwards, strongly so when `num` is below the feature
dimension (the sample covariance then has rank < D). Compare numbers only at equal `num`, feature extractor and
real split; `real_floor` gives the value two real sets of the same size reach, for scale.
"""
import sys
import time
import warnings

import mindspore as ms
import numpy as np
from scipy import linalg

from ..data import create_dataset, iterate
from ..pipeline import DiffusionPipeline, default_sampler
from ..utils import check_int
from .features import MNISTClassifier, load_feature_extractor
from .frechet import feature_statistics, frechet_distance, kernel_distance
from .likelihood import ODE_STEPS, calc_bpd_loop, ode_bpd

PIXEL_NOTE = "pixel-space FD, not comparable to FID"
CONFIDENCE = 0.9  # a sample is "confidently classified" above this softmax probability


def _log(message):
    print(message, file=sys.stderr, flush=True)


def real_images(cfg, data_root, split, batch_size, num=None, seed=None, labels=False):
    """float32 images (N, C, H, W) in [-1, 1] of `split` at the config's size and channels: all of them in file
    order, or the first `num` of a permutation seeded with `seed`. With `labels`: (images, int32 (N,) labels)."""
    c = cfg.data
    root = c.root if data_root is None else data_root
    dataset = create_dataset(c.name, root, split, c.image_size, c.channels, batch_size, shuffle=num is not None,
                             seed=seed, drop_remainder=False, **(dict(labels=True) if labels else {}))
    if num is not None and num > dataset.num_images:
        raise ValueError(f"num={num} is more than the {dataset.num_images} images of the {split} split")
    columns = []
    for batch in iterate(dataset):
        columns.append(batch)
        if num is not None and sum(len(b[0]) for b in columns) >= num:
            break
    images, *label = (np.concatenate(column)[:num] for column in zip(*columns))
    return (images, label[0]) if labels else images


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


def feature_space(feature_ckpt, cfg):
    """(extractor or None, the extractor's kind ("mnist_classifier", "fid_inception_v3") or "pixels") for the images
    of a model trained with `cfg`; None `feature_ckpt`: raw pixels."""
    if feature_ckpt is None:
        return None, "pixels"
    extractor = load_feature_extractor(feature_ckpt)
    if cfg.data.channels not in extractor.input_channels:
        raise ValueError(f"the feature extractor ({extractor.kind}) takes {list(extractor.input_channels)}-channel "
                         f"images, the model makes {cfg.data.channels}-channel ones")
    return extractor, extractor.kind


def pixel_note(option="--features"):
    """Say, on stderr, that FD and KID are computed on raw pixels because `option` was not given."""
    _log(f"NOTE: no feature extractor given ({option}): {PIXEL_NOTE}")


def distances(fake, real, seed, real_statistics=None):
    """FD and KID between two (N, D) feature sets, with a warning when N < D makes FD mostly estimator bias.
    `real_statistics`: `feature_statistics(real)`, when computed already (once for many sets of samples)."""
    n, d = min(len(fake), len(real)), fake.shape[1]
    mu1, sigma1 = feature_statistics(fake)
    mu2, sigma2 = feature_statistics(real) if real_statistics is None else real_statistics
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


def _logits(images, classifier, batch_size):
    """(N, classes) float64 logits of `classifier` (an `MNISTClassifier`) for `images` (N, C, H, W), in batches."""
    return np.concatenate([classifier(ms.Tensor(images[s:s + batch_size])).asnumpy()
                           for s in range(0, len(images), batch_size)]).astype(np.float64)


def class_accuracy(samples, labels, classifier, batch_size):
    """Share of `samples` (N, C, H, W) that `classifier` (an `MNISTClassifier`) assigns to their `labels` (N,)."""
    return float((_logits(samples, classifier, batch_size).argmax(axis=1) == labels).mean())


def confident_share(images, classifier, batch_size, threshold=CONFIDENCE):
    """Share of `images` (N, C, H, W) whose most likely class under `classifier` (an `MNISTClassifier`) has a
    softmax probability above `threshold`: digits a reader recognises, whatever their class (the 1,000 real test
    digits of mnist5k reach 0.956 with the classifier of scripts/train_classifier.py, 98.0% accurate on them)."""
    logits = _logits(images, classifier, batch_size)
    logits -= logits.max(axis=1, keepdims=True)  # the largest probability is 1 / sum(exp(logit - max logit))
    return float((1.0 / np.exp(logits).sum(axis=1) > threshold).mean())


def _mean_bpd(real_test, labels, batches, batch_size, bpd_fn):
    """Mean of `bpd_fn(images, labels, i)["total_bpd"]` over the first `batches` test batches (labels None for an
    unconditional model): (mean, number of images)."""
    totals = []
    for i in range(batches):
        batch = real_test[i * batch_size:(i + 1) * batch_size]
        if len(batch) == 0:
            break
        cond = None if labels is None else ms.Tensor(labels[i * batch_size:(i + 1) * batch_size])
        totals.append(bpd_fn(ms.Tensor(batch), cond, i)["total_bpd"])
    totals = np.concatenate(totals)
    return float(totals.mean()), len(totals)


def _check_common(num, batch_size, bpd_batches=0):
    check_int("num", num, 2)  # a covariance needs two samples
    check_int("batch_size", batch_size, 1)
    check_int("bpd_batches", bpd_batches, 0)


def evaluate(ckpt, sampler=None, steps=None, num=1000, batch_size=250, seed=0, feature_ckpt=None, data_root=None,
             bpd_batches=0, bpd_ode_batches=0, bpd_ode_steps=ODE_STEPS, mode="graph", device="CPU", progress=True,
             guidance_scale=1.0):
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
        guidance_scale: classifier-free guidance scale of a class-conditional model (1: none).

    Returns:
        dict with fd, kid, bits_per_dim and bits_per_dim_ode (None when skipped), class_accuracy (None unless
        measured), samples_per_s, sampling_s, warmup_s and the settings.
    """
    _check_common(num, batch_size, bpd_batches)
    check_int("bpd_ode_batches", bpd_ode_batches, 0)
    check_int("bpd_ode_steps", bpd_ode_steps, 2)
    if steps is not None:
        check_int("steps", steps, 1)

    pipe = DiffusionPipeline.from_checkpoint(ckpt, mode=mode, device=device)
    cfg, net, process = pipe.config, pipe.network, pipe.process
    if bpd_batches and process.name != "ddpm":
        raise ValueError("bits/dim from the variational bound needs a DDPM chain; this checkpoint's "
                         f"diffusion.process is {process.name}: drop bpd_batches")
    if bpd_ode_batches and process.name not in ("ddpm", "ncsn"):
        raise ValueError(f"ODE bits/dim integrates the score SDEs of ddpm and ncsn; diffusion.process {process.name} "
                         "has none here: drop bpd_ode_batches")
    if pipe.first_stage is not None and (bpd_batches or bpd_ode_batches):
        raise ValueError("bits/dim of a latent diffusion model would be those of its latents, not of the images: "
                         "drop --bpd-batches and --bpd-ode-batches")
    name = sampler or default_sampler(cfg)
    chain = pipe.create_sampler(name)  # a sampler of the other process is refused here
    if steps is not None:  # else the sampler's default: every training timestep / noise level, or ald's 100 per level
        chain.set_timesteps(steps)
    model = pipe.guided(guidance_scale)  # a scale the model cannot take is refused before the long sampling
    labels = pipe.labels(num)
    extractor, space = feature_space(feature_ckpt, cfg)
    # checks the data before the long sampling
    real = real_images(cfg, data_root, "test", batch_size, labels=pipe.conditional)
    real_test, real_labels = real if pipe.conditional else (real, None)
    c = cfg.data
    sizes = [min(batch_size, num - s) for s in range(0, num, batch_size)]

    start = time.perf_counter()
    # untimed: compiles the network and warms every kernel up
    pipe(sizes[0], guidance_scale=guidance_scale, sampler=chain, seed=seed, batch_size=batch_size, progress=progress)
    if sizes[-1] != sizes[0]:  # the smaller last batch has a shape of its own: one step compiles it, untimed
        shape = (sizes[-1],) + pipe.sample_shape
        cond = None if labels is None else ms.Tensor(labels[:sizes[-1]])
        pipe.to_images(next(chain.sample_progressive(model, shape, seed=seed, progress=False, cond=cond)).prev_sample)
    warmup_s = time.perf_counter() - start

    start = time.perf_counter()
    # the samples come back as NumPy, which waits for the device, so the wall time is complete
    samples, labels = pipe(num, guidance_scale=guidance_scale, sampler=chain, seed=seed, batch_size=batch_size,
                           progress=progress)
    sampling_s = time.perf_counter() - start
    samples = to_8bit_grid(samples)
    if not np.isfinite(samples).all():
        raise ValueError(f"the samples of {ckpt} are not finite")

    real_feats = extract_features(real_test, extractor, batch_size)
    if extractor is None:
        pixel_note()
    fd, kid = distances(extract_features(samples, extractor, batch_size), real_feats, seed)
    accuracy = None
    confident = confident_share(samples, extractor, batch_size) if isinstance(extractor, MNISTClassifier) else None
    if pipe.conditional:
        if isinstance(extractor, MNISTClassifier) and extractor.config["num_classes"] == len(pipe.class_names):
            accuracy = class_accuracy(samples, labels, extractor, batch_size)
        else:
            _log("NOTE: class accuracy needs the MNIST classifier (--features) with the model's number of classes")

    bpd, bpd_images = None, 0
    if bpd_batches:
        _log(f"bits/dim: {process.num_timesteps} network evaluations per batch of {batch_size} test images "
             f"({bpd_batches} batch(es))")
        bpd, bpd_images = _mean_bpd(real_test, real_labels, bpd_batches, batch_size, lambda x, y, i: calc_bpd_loop(
            process, net, x, seed=seed + i, progress=progress, cond=y))

    bpd_ode, bpd_ode_images = None, 0
    if bpd_ode_batches:
        _log(f"bits/dim (ODE): up to {2 * (bpd_ode_steps - 1)} network evaluations, each with a vector-Jacobian "
             f"product, per batch of {batch_size} test images ({bpd_ode_batches} batch(es))")
        bpd_ode, bpd_ode_images = _mean_bpd(
            real_test, real_labels, bpd_ode_batches, batch_size, lambda x, y, i: ode_bpd(
                process, net, x, num_steps=bpd_ode_steps, dequantize=True, seed=seed + i, progress=progress, cond=y))

    return {
        "checkpoint": str(ckpt), "checkpoint_step": pipe.checkpoint_step, "weights": pipe.weights,
        "dataset": c.name, "image_size": c.image_size, "real_split": "test", "num_real": len(real_test),
        "sampler": name, "steps": chain.num_inference_steps,
        # a guided step calls the network on the doubled batch: two evaluations per sample
        "network_evaluations_per_sample": len(chain.timesteps) * (1 if model is net else 2),
        "num": num, "batch_size": batch_size, "seed": seed, "mode": mode, "device": device,
        "guidance_scale": guidance_scale, "class_accuracy": accuracy, "confident": confident,
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
    cfg = DiffusionPipeline.from_checkpoint(ckpt, mode=mode, device=device).config
    extractor, space = feature_space(feature_ckpt, cfg)
    real_test = real_images(cfg, data_root, "test", batch_size)
    real_train = real_images(cfg, data_root, "train", batch_size, num=num, seed=seed)
    real_feats = extract_features(real_test, extractor, batch_size)
    if extractor is None:
        pixel_note()
    fd, kid = distances(extract_features(real_train, extractor, batch_size), real_feats, seed)
    confident = confident_share(real_train, extractor, batch_size) if isinstance(extractor, MNISTClassifier) else None
    c = cfg.data
    return {
        "checkpoint": str(ckpt), "real_floor": True, "dataset": c.name, "image_size": c.image_size,
        "real_split": "test", "num_real": len(real_test), "compared_split": "train", "num": num,
        "batch_size": batch_size, "seed": seed, "mode": mode, "device": device, "features": space,
        "feature_checkpoint": None if feature_ckpt is None else str(feature_ckpt), "feature_dim": real_feats.shape[1],
        "note": PIXEL_NOTE if extractor is None else None, "fd": fd, "kid": kid, "confident": confident,
    }


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
    if result.get("class_accuracy") is not None:
        lines.append(f"class accuracy: {result['class_accuracy']:.4f} (share of {result['num']} samples the classifier "
                     f"assigns to their class; guidance scale {result['guidance_scale']:g})")
    if result.get("confident") is not None:
        lines.append(f"confident: {result['confident']:.4f} (share of the {result['num']} images the classifier "
                     f"gives one class with probability above {CONFIDENCE:g})")
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
