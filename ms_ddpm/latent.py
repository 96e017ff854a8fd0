"""Diffusion in the latent space of an autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"): the diffusion model is trained on z = E(x) * scaling_factor and its samples are decoded,
x = D(z / scaling_factor).

    autoencoder, kwargs = load_autoencoder("outputs/vae_mnist5k/ckpt_00002000.ckpt")
    cache = encode_split(autoencoder, cfg.data, "train")            # posterior means, once per run
    scale = auto_scaling_factor(cache.latents)                        # 1 / std of the training latents
    dataset = cache.dataset(batch_size=32, seed=0, scaling_factor=scale)  # a mindspore.dataset, no encoder in it

Which latent: the posterior mean E[z | x], not a sample. The cache is encoded once, so a sample would be one draw
frozen for every epoch, noise the diffusion model would learn as if it were data; LDM draws a fresh sample at each
step (its `get_first_stage_encoding`), which a cache cannot do without storing the variances too. With the small
KL weight of the first stage (1e-6) the posterior's standard deviation is small against the spread of the means
(the trainer logs both), so the mean loses little, and the cache is then a deterministic function of the data
(tests/test_latent.py: the cache equals encoding on the fly).

`scaling_factor: auto` is Sec. 4.3.2 / Appendix D.1 of the paper: rescale the latents by 1 / (their standard
deviation), so that the diffusion's unit-variance prior and noise schedule fit them as they fit images in [-1, 1]
(LDM estimates it on the first batch, here on the whole training split). A converted diffusers VAE comes with the
factor it was published with (Stable Diffusion's 0.18215, measured so on its training data), which auto keeps
(`resolve_scaling_factor`); a number overrides either.
"""
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
from mindspore import nn

from .checkpoint import load_verified, load_weights
from .config import Config, ConfigError
from .data import create_dataset, iterate
from .data.datasets import create_array_dataset
from .models import apply_batched
from .models.autoencoder_kl import AutoencoderKL
from .utils import constructor_arguments

__all__ = ["FirstStage", "LatentCache", "auto_scaling_factor", "diffusion_shape", "encode_split", "load_autoencoder",
           "resolve_scaling_factor"]

# images per encoder call while building a cache
ENCODE_BATCH = 250


def load_autoencoder(path):
    """(AutoencoderKL with its weights, its constructor kwargs) from `path`: a checkpoint of an `ms-ddpm train` run
    with model.name autoencoder_kl (its EMA weights when it has them), or one written by
    scripts/convert_diffusers_vae.py. Raises ConfigError (CheckpointError for a missing or damaged file, or one
    without the weights of its arguments)."""
    state = load_verified(path, "autoencoder checkpoint", "train one with a model.name: autoencoder_kl config "
                          "(configs/vae_mnist5k_cpu.yaml) or convert one with scripts/convert_diffusers_vae.py",
                          "train or convert it again")
    if "config" in state:  # a training run's checkpoint
        cfg = Config.from_stored(state["config"])
        if cfg.model.name != "autoencoder_kl":
            raise ConfigError(f"latent.autoencoder {path} is a checkpoint of a model.name {cfg.model.name!r} run, "
                              "not of an autoencoder: give one of a model.name autoencoder_kl run")
        kwargs = dict(cfg.model.kwargs)
    elif "autoencoder_kl" in state:  # scripts/convert_diffusers_vae.py: its config's scaling_factor among them
        kwargs = json.loads(str(state["autoencoder_kl"]))
    else:
        raise ConfigError(f"latent.autoencoder {path} holds neither a training run's config nor the converter's "
                          "'autoencoder_kl' entry: it is not an autoencoder checkpoint of ms_ddpm")
    autoencoder = AutoencoderKL(**kwargs)
    load_weights(autoencoder, state, f"latent.autoencoder {path}")  # a converter's checkpoint has no EMA weights
    autoencoder.set_train(False)
    return autoencoder, kwargs


def diffusion_shape(cfg):
    """(C, H, W) of what the diffusion network of a run with `cfg` sees: the images, or for a latent run (its
    `latent.autoencoder_kwargs` filled in by the trainer) their latents (latent_channels, H / f, W / f)."""
    c = cfg.data
    kwargs = cfg.latent.autoencoder_kwargs
    if kwargs is None:
        return (c.channels, c.image_size, c.image_size)
    args = constructor_arguments(AutoencoderKL, kwargs)
    f = 2 ** (len(args["block_out_channels"]) - 1)
    return (args["latent_channels"], c.image_size // f, c.image_size // f)


class FirstStage(nn.Cell):
    """The decoder side of a latent run: construct(z) -> D(z / scaling_factor), diffusion samples (B, c, h, w) to
    images (B, C, h f, w f). Its parameters are the autoencoder's under "autoencoder." (how the run's checkpoints
    carry them)."""

    def __init__(self, autoencoder, scaling_factor):
        super().__init__()
        self.autoencoder = autoencoder
        self.scaling_factor = float(scaling_factor)

    def construct(self, z):
        return self.autoencoder.decode(z / self.scaling_factor)


class _Encoder(nn.Cell):
    """x -> (mean, logvar) of q(z | x) (the autoencoder's `encode` as one Cell, so graph mode compiles it)."""

    def __init__(self, autoencoder):
        super().__init__(auto_prefix=False)
        self.autoencoder = autoencoder

    def construct(self, x):
        return self.autoencoder.encode(x)


@dataclass
class LatentCache:
    """The latents of a data split: `latents` (N, c, h, w) float32 posterior means, unscaled, in the split's file
    order; `labels` (N,) int32 or None; `posterior_std` the mean standard deviation of q(z | x) over the split."""

    latents: np.ndarray
    labels: Optional[np.ndarray]
    posterior_std: float

    def dataset(self, batch_size, scaling_factor, shuffle=True, seed=None, num_shards=None, shard_id=None):
        """A `mindspore.dataset` of the cached latents times `scaling_factor` (column "image", and "label" when
        the cache has labels), shuffled, sharded and seeded as `create_dataset` shuffles the images: the same seed
        gives the latents of the images in the same order."""
        arrays = [(self.latents * np.float32(scaling_factor)).astype(np.float32)]
        if self.labels is not None:
            arrays.append(self.labels)
        return create_array_dataset(arrays, ["image", "label"][:len(arrays)], batch_size, shuffle=shuffle,
                                    seed=seed, num_shards=num_shards, shard_id=shard_id)


def encode_split(autoencoder, data_cfg, split="train", labels=False):
    """Encode a split of the config's data once: a `LatentCache` of its posterior means (and labels)."""
    c = data_cfg
    images = create_dataset(c.name, c.root, split, c.image_size, c.channels, ENCODE_BATCH, shuffle=False,
                            download=c.download, num_parallel_workers=c.num_parallel_workers, drop_remainder=False,
                            **(dict(labels=True) if labels else {}))
    columns = list(zip(*iterate(images)))
    mean, logvar = apply_batched(_Encoder(autoencoder), np.concatenate(columns[0]), ENCODE_BATCH)
    return LatentCache(mean.astype(np.float32), np.concatenate(columns[1]).astype(np.int32) if labels else None,
                       float(np.exp(0.5 * logvar).mean()))


def resolve_scaling_factor(setting, autoencoder, latents):
    """The factor `latent.scaling_factor: setting` means for `autoencoder`: a number as given (it overrides the
    autoencoder's own); auto: the autoencoder's own `scaling_factor` when it has one (a converted diffusers VAE
    carries its config's, 0.18215 for Stable Diffusion's), else, for one trained here, `auto_scaling_factor` of
    `latents()` (a callable: the latents are needed only then)."""
    if setting != "auto":
        return float(setting)
    if autoencoder.scaling_factor is not None:
        return autoencoder.scaling_factor
    return auto_scaling_factor(latents())


def auto_scaling_factor(latents):
    """1 / std of all latent entries (Rombach et al. 2022, Sec. 4.3.2; LDM's `scale_by_std`: 1 / z.flatten().std()),
    in float64."""
    return float(1.0 / np.asarray(latents, np.float64).std())
