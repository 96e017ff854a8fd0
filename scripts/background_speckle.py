"""How many samples of a class-conditional MNIST checkpoint have a speckled grey background instead of black, per
sampler, guidance scale and treatment of the predicted x_0 (docs/quality.md, "Speckled backgrounds").

    python scripts/background_speckle.py --ckpt outputs/mnist5k_cond/ckpt_00001200.ckpt --num 200 \
        --variants ddim:50:2:clip ddim:50:1:clip ddpm:100:2:clip --json outputs/speckle.jsonl

A variant is SAMPLER:STEPS:SCALE:X0[:LATE_SCALE:T], SAMPLER ddim (eta 0) or ddpm (ancestral), X0 one of
  clip     x_0 clipped to [-1, 1] and eps re-derived from it (the samplers' default),
  none     x_0 unclipped and the network's own eps,
  dynamic  Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3; percentile 99.5%),
and LATE_SCALE the guidance scale used instead of SCALE at the timesteps below T. The reverse steps are the
samplers' own coefficients (`coefficients`) applied in NumPy, so that x_0 can be treated in each way; with `clip` the
loop gives the library's DDIM samples. Sample i has label i mod 10 and every variant starts from the same x_T (seed
1000 + first index of its batch), so variants differ only by their settings.

`--denoise-timesteps 20 100 500` also asks the network alone: test digits noised to each timestep, denoised in one
call (the clipped x0_hat), and the share of their background border pixels it puts above 32/255.

A sample counts as speckled when more than a fifth of its border (the outer 4 pixels, outside the 20 x 20 box MNIST
centres its digits in) is brighter than 32/255; none of the 1,000 test digits is. Each row also gives the mean
predicted x_0 of the border at a few timesteps, for the speckled samples and the others: where the grey comes in.
"""
import argparse
import json
import os
import sys

import numpy as np

BORDER = np.ones((28, 28), bool)
BORDER[4:24, 4:24] = False
BRIGHT = -0.75  # 32/255 of an 8-bit image, in [-1, 1]
SPECKLED_SHARE = 0.2
X0_MODES = ("clip", "none", "dynamic")


def speckled(images):
    """(N,) bool: more than SPECKLED_SHARE of the border of images (N, 1, 28, 28) in [-1, 1] brighter than 32/255."""
    return (images[:, 0][:, BORDER] > BRIGHT).mean(axis=1) > SPECKLED_SHARE


def parse_variant(text):
    parts = text.split(":")
    if len(parts) not in (4, 6) or parts[0] not in ("ddim", "ddpm") or parts[3] not in X0_MODES:
        raise ValueError(f"a variant is SAMPLER:STEPS:SCALE:X0[:LATE_SCALE:T] with SAMPLER ddim or ddpm and X0 in "
                         f"{list(X0_MODES)}, got {text!r}")
    late = (float(parts[4]), int(parts[5])) if len(parts) == 6 else (float(parts[2]), -1)
    return parts[0], int(parts[1]), float(parts[2]), parts[3], late


def treat_x0(x0, mode):
    if mode == "clip":
        return np.clip(x0, -1, 1)
    if mode == "dynamic":  # s = the 99.5th percentile of |x0| per sample, at least 1; clip to [-s, s], divide by s
        s = np.maximum(np.quantile(np.abs(x0).reshape(len(x0), -1), 0.995, axis=1), 1.0)[:, None, None, None]
        return np.clip(x0, -s, s) / s
    return x0


def draw(pipe, variant, num, batch_size):
    """Samples (num, 1, 28, 28) in [-1, 1] of one variant and the border mean of x0_hat at every step (num, steps)."""
    import mindspore as ms

    from ms_ddpm.processes import predict_eps, predict_x0, vp_alpha_sigma

    name, steps, scale, mode, (late_scale, switch) = parse_variant(variant)
    sampler = pipe.create_sampler(name)
    sampler.set_timesteps(steps)
    objective = pipe.process.objective
    samples, trajectories = [], []
    for first in range(0, num, batch_size):
        n = min(batch_size, num - first)
        labels = ms.Tensor((np.arange(first, first + n) % 10).astype(np.int32))
        rng = np.random.default_rng(1000 + first)
        x = rng.standard_normal((n, 1, 28, 28), dtype=np.float32)
        trajectory = []
        for t in map(int, sampler.timesteps):
            network = pipe.guided(late_scale if t < switch else scale)
            out = network(ms.Tensor(x), ms.Tensor(np.full(n, t, np.int32)), labels).asnumpy()
            alpha_bar = sampler.alpha_bar(t)
            alpha, sigma = vp_alpha_sigma(alpha_bar)
            x0 = treat_x0(predict_x0(objective, out, x, alpha, sigma), mode)
            eps = predict_eps(objective, out, x, alpha, sigma) if mode == "none" else predict_eps("x0", x0, x, alpha, sigma)
            trajectory.append(x0[:, 0][:, BORDER].mean(axis=1))
            coefficients = sampler.coefficients(t)
            if name == "ddim":  # Song et al. Eq. 12, eta 0
                x = coefficients[1] * x0 + coefficients[2] * eps
            else:  # Ho et al. Algorithm 2: the posterior mean plus sigma_t z
                x = (coefficients[1] * x0 + coefficients[2] * x
                     + coefficients[3] * rng.standard_normal(x.shape, dtype=np.float32))
            x = x.astype(np.float32)
        samples.append(np.clip(x, -1, 1))
        trajectories.append(np.stack(trajectory, axis=1))
    return np.concatenate(samples), np.concatenate(trajectories), [int(t) for t in sampler.timesteps]


def denoised_border(pipe, digits, labels, timesteps):
    """The network at one noise level on real digits (N, 1, 28, 28) with their labels: for each timestep, the share
    of the border pixels that are background in the digit (-1) and that the clipped x0_hat puts above 32/255."""
    import mindspore as ms

    from ms_ddpm.processes import predict_x0, vp_alpha_sigma

    background = (digits[:, 0] == -1) & BORDER
    rng = np.random.default_rng(0)
    shares = {}
    for t in timesteps:
        alpha_bar = float(pipe.process.alphas_cumprod[t])
        x_t = (alpha_bar**0.5 * digits + (1 - alpha_bar) ** 0.5 * rng.standard_normal(digits.shape)).astype(np.float32)
        out = pipe.network(ms.Tensor(x_t), ms.Tensor(np.full(len(digits), t, np.int32)), ms.Tensor(labels)).asnumpy()
        x0 = np.clip(predict_x0(pipe.process.objective, out, x_t, *vp_alpha_sigma(alpha_bar)), -1, 1)
        shares[str(t)] = float((x0[:, 0][background] > BRIGHT).mean())
    return shares


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a class-conditional MNIST checkpoint of `ms-ddpm train`")
    p.add_argument("--num", type=int, default=200, help="samples per variant")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--variants", nargs="+", default=[], metavar="SAMPLER:STEPS:SCALE:X0[:LATE_SCALE:T]")
    p.add_argument("--denoise-timesteps", nargs="+", type=int, default=[],
                   help="also: the first --num test digits noised to each of these timesteps and denoised in one "
                        "network call; the share of their background border pixels above 32/255")
    p.add_argument("--json", required=True, help="one row per variant is appended here (JSON lines)")
    args = p.parse_args(argv)
    try:
        for variant in args.variants:
            parse_variant(variant)
    except ValueError as err:
        p.error(str(err))

    import mindspore as ms

    from ms_ddpm import DiffusionPipeline

    ms.set_context(mode=ms.GRAPH_MODE)
    pipe = DiffusionPipeline.from_checkpoint(args.ckpt)
    if args.denoise_timesteps:
        from ms_ddpm.data.embedded import embedded_mnist_root

        root = embedded_mnist_root()
        with open(os.path.join(root, "t10k-images-idx3-ubyte"), "rb") as f:
            digits = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:args.num]
        with open(os.path.join(root, "t10k-labels-idx1-ubyte"), "rb") as f:
            labels = np.frombuffer(f.read(), np.uint8, offset=8)[:args.num].astype(np.int32)
        row = {"denoised_test_digits": len(digits), "background_border_above_32": denoised_border(
            pipe, digits.astype(np.float32) / 127.5 - 1, labels, args.denoise_timesteps)}
        print(json.dumps(row), flush=True)
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    first_flags = None
    for variant in args.variants:
        samples, trajectory, timesteps = draw(pipe, variant, args.num, args.batch_size)
        flags = speckled(samples)
        first_flags = flags if first_flags is None else first_flags
        at = sorted({0, len(timesteps) // 4, len(timesteps) // 2, len(timesteps) - 1})
        row = {"variant": variant, "num": len(samples), "speckled": float(flags.mean()),
               "speckled_also_in_first_variant": int((flags & first_flags).sum()),
               "x0_border_mean": {str(timesteps[i]): {"speckled": float(trajectory[flags, i].mean()) if flags.any()
                                                      else None, "others": float(trajectory[~flags, i].mean())}
                                  for i in at}}
        print(json.dumps(row), flush=True)
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
