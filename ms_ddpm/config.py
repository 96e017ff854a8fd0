"""Run configuration: sections model, diffusion, data, train (and autoencoder, latent for latent diffusion) read
from YAML, checked, overridable.

Unknown keys are rejected with the list of valid ones, so a typo never silently falls back to a default, and every
value is checked against its field's type (`train.steps: many` is refused by name).
Overrides use dotted keys with YAML-typed values: `train.lr=1e-4`, `model.kwargs.dim_mults=[1,2,4]`; a key inside a
mapping field (`model.kwargs.dim=32`) changes that entry and keeps the others.
The resolved config is written next to the checkpoints and stored inside each checkpoint, so sampling and resuming
rebuild everything from the checkpoint alone.
"""
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml


@dataclass
class ModelConfig:
    # "unet" (annotated-diffusion U-Net), "ddpm_unet" (the DDPM paper's CIFAR-10 network), or "autoencoder_kl" (the
    # latent-diffusion first stage, trained with the autoencoder section's loss instead of a diffusion)
    name: str = "unet"
    kwargs: dict = field(default_factory=lambda: {"dim": 16, "dim_mults": [1, 2], "channels": 1})  # constructor args


PROCESSES = ("ddpm", "ncsn")
# diffusion keys of process "ncsn"; all others but COMMON_KEYS belong to "ddpm"
NCSN_KEYS = ("sigma_max", "sigma_min", "num_noise_levels", "langevin_step_lr")
COMMON_KEYS = ("process", "cond_drop_prob", "clip_denoised")


@dataclass
class DiffusionConfig:
    """The noise process the network is trained on: a DDPM chain (Ho et al. 2020) or NCSN's noise levels (Song &
    Ermon 2019). Keys of the other process must keep their defaults, so a setting that would do nothing is refused.

    NCSN defaults: the paper's MNIST levels sigma_1 = 1 > ... > sigma_10 = 0.01 and Langevin step eps = 2e-5 (Sec. 5)
    are for images in [0, 1]; ours are in [-1, 1], twice as wide, so the sigmas double and eps, which sets
    alpha_i = eps sigma_i^2 / sigma_L^2 in units of squared distance, quadruples: the same dynamics, rescaled.
    """

    process: str = "ddpm"  # ddpm (Gaussian diffusion chain) | ncsn (noise-conditional score network)
    # classifier-free guidance (Ho & Salimans 2021, Algorithm 1): the probability with which training replaces a
    # class label by the null label, so one network also learns the unconditional model; class-conditional models only
    cond_drop_prob: float = 0.0
    # clip the predicted x_0 to [-1, 1] when sampling (the data's range); None: in pixel space yes, in the latent
    # space of a `latent` run no (latents are not bounded)
    clip_denoised: Optional[bool] = None
    # process ddpm
    num_timesteps: int = 1000  # T, training chain length
    beta_schedule: str = "linear"  # linear | cosine | quadratic | sigmoid
    beta_start: float = 1.0e-4  # first beta (linear / quadratic / sigmoid); not rescaled with T
    beta_end: float = 0.02  # last beta
    objective: str = "eps"  # what the network predicts: eps | x0 | v
    variance_type: str = "fixed_small"  # reverse variance for DDPM sampling: fixed_small | fixed_large
    loss_type: str = "l2"  # l1 | l2 | huber (smooth L1, as the annotated tutorial)
    loss_weighting: str = "none"  # none | p2 | min_snr
    min_snr_gamma: float = 5.0  # gamma of min-SNR weighting (Hang et al. 2023)
    p2_gamma: float = 1.0  # gamma of P2 weighting (Choi et al. 2022)
    p2_k: float = 1.0  # k of P2 weighting
    # process ncsn
    sigma_max: float = 2.0  # sigma_1, the largest noise level (paper: 1 for [0, 1] images)
    sigma_min: float = 0.02  # sigma_L, the smallest (paper: 0.01 for [0, 1] images)
    num_noise_levels: int = 10  # L, geometric sequence from sigma_max to sigma_min (paper: 10)
    langevin_step_lr: float = 8.0e-5  # eps of annealed Langevin dynamics, Algorithm 1 (paper: 2e-5 for [0, 1])

    def __post_init__(self):
        if self.process not in PROCESSES:
            raise ConfigError(f"diffusion.process must be one of {list(PROCESSES)}, got {self.process!r}")
        p = self.cond_drop_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ConfigError(f"diffusion.cond_drop_prob must be in [0, 1) (0.1 is usual), got {self.cond_drop_prob!r}")
        if self.process == "ncsn" and self.clip_denoised:
            raise ConfigError("diffusion.clip_denoised: the NCSN samplers do not clip; drop it")
        other = "ddpm" if self.process == "ncsn" else "ncsn"
        idle = [f.name for f in dataclasses.fields(self)
                if f.name not in COMMON_KEYS and (f.name in NCSN_KEYS) == (other == "ncsn")
                and getattr(self, f.name) != f.default]
        if idle:
            raise ConfigError(f"diffusion key(s) {idle} are settings of process {other!r} and do nothing with "
                              f"diffusion.process {self.process!r}: remove them, or set diffusion.process: {other}")


@dataclass
class DataConfig:
    name: str = "mnist"  # mnist | fashion_mnist | cifar10 | folder
    # dataset folder (relative paths are taken from the working directory); None: for mnist, the 4,000 + 1,000 real
    # digits the package carries (ms_ddpm/data/mnist5k/README.md), so the quick start needs nothing beside it
    root: Optional[str] = None
    image_size: int = 28  # images are resized and centre-cropped to this size
    channels: int = 1  # 1 (grayscale) or 3 (RGB)
    random_flip: bool = False  # random horizontal flips (CIFAR-10 in the DDPM paper)
    download: bool = False  # fetch the official archive when root is missing
    # workers reading and transforming images; None: the data package's default (the usable cores but one, at
    # most 8: `ms_ddpm.data.datasets.default_workers`)
    num_parallel_workers: Optional[int] = None
    # class names in label order (label i is class_names[i]); class-conditional runs fill them in from the data
    class_names: Optional[list] = None


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"  # checkpoints, logs, config and sample grids go here
    seed: int = 0  # seeds weights, data order, timesteps and noise
    mode: str = "graph"  # graph (GRAPH_MODE, whole network compiled) | pynative
    device: str = "CPU"  # CPU | GPU | Ascend
    batch_size: int = 32  # per-device batch
    steps: int = 1000  # optimizer steps in total
    optimizer: str = "adam"  # adam | adamw
    lr: float = 2.0e-4  # peak learning rate
    min_lr: float = 0.0  # final learning rate of the cosine decay
    warmup_steps: int = 100  # linear warmup from 0 to lr
    lr_schedule: str = "cosine"  # cosine (decay to min_lr after warmup) | constant (lr after warmup)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # clip gradients to this global norm; 0 disables
    grad_accumulation: int = 1  # micro-batches per optimizer step
    amp_level: str = "O0"  # O0 (float32) | O1 | O2 | O3 mixed precision
    # recompute each U-Net block's activations in the backward pass instead of storing them (Cell.recompute):
    # less memory for more compute; the losses and gradients stay the same
    recompute: bool = False
    amp_dtype: str = "float16"  # float16 | bfloat16 (bfloat16 needs Ascend or GPU)
    loss_scaler: str = "dynamic"  # dynamic | static | none
    loss_scale: float = 65536.0  # initial (dynamic) or fixed (static) loss scale
    loss_scale_window: int = 1000  # good steps before the dynamic scale doubles
    ema_decay: float = 0.9999  # EMA decay; 0 disables EMA
    ema_warmup: bool = True  # use min(decay, (1 + n) / (10 + n)) so early averages are not dominated by init
    ema_every: int = 1  # update the EMA every this many steps
    log_every: int = 10  # steps between log lines (JSON lines in train_log.jsonl)
    sample_every: int = 500  # steps between sample grids of the EMA model; 0 disables
    num_samples: int = 16  # images in each sample grid
    sampler: str = "ddim"  # sampler of the periodic grids
    sample_steps: int = 50  # its number of steps
    # FD / KID of the EMA model against the test split while training (ms_ddpm.train.evaluation), on rank 0,
    # logged to train_log.jsonl and plotted in metrics.png; the lowest FD's checkpoint is kept as ckpt_best.ckpt
    eval_every: int = 0  # steps between evaluations (and at the last step); 0 disables
    eval_num: int = 256  # samples per evaluation (FD is biased upwards at small numbers: compare at one eval_num)
    eval_batch_size: int = 256  # samples per sampling batch
    eval_sampler: str = "ddim"  # sampler of the evaluations (DDIM: eta 0)
    eval_steps: int = 10  # its number of steps
    # feature-extractor checkpoint (as ms-ddpm evaluate --features); None: for MNIST / Fashion-MNIST a classifier
    # trained once per data set and cached, for other data raw pixels (a pixel-space FD, not comparable to FID)
    eval_features: Optional[str] = None
    save_every: int = 500  # steps between checkpoints
    keep_checkpoints: int = 3  # newest checkpoints kept
    max_nonfinite_steps: int = 50  # abort when this many steps in a row have a non-finite loss or gradients

    def __post_init__(self):
        # Refused, not clamped: a warmup cut to the run's length would reach the peak LR only at the last step, a
        # schedule the config does not describe. (train.steps < 1 is refused by the trainer.)
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_steps > self.steps >= 1:
            raise ConfigError(
                f"train.warmup_steps ({self.warmup_steps}) > train.steps ({self.steps}): the linear warmup must end "
                f"within the run; set train.warmup_steps <= {self.steps} (e.g. --set train.warmup_steps="
                f"{self.steps // 10}) or raise train.steps")


RECONSTRUCTION_LOSSES = ("l1", "l2")


@dataclass
class AutoencoderConfig:
    """The loss of a `model.name: autoencoder_kl` run, the LDM first stage (Rombach et al. 2022, Sec. 3.1 and
    Appendix G) without its perceptual and adversarial terms: per image, the reconstruction error summed over
    pixels plus kl_weight x KL(q(z | x) || N(0, I)), averaged over the batch (`ms_ddpm.losses.AutoencoderLoss`)."""

    loss_type: str = "l1"  # reconstruction error: l1 (LDM's) | l2
    kl_weight: float = 1.0e-6  # weight of the KL term (LDM's KL-f models: 1e-6, "a slight KL-penalty")

    def __post_init__(self):
        if self.loss_type not in RECONSTRUCTION_LOSSES:
            raise ConfigError(f"autoencoder.loss_type must be one of {list(RECONSTRUCTION_LOSSES)}, got "
                              f"{self.loss_type!r}")
        if not self.kl_weight >= 0:
            raise ConfigError(f"autoencoder.kl_weight must be >= 0, got {self.kl_weight!r}")


@dataclass
class LatentConfig:
    """Diffusion in the latent space of a trained autoencoder (Rombach et al. 2022): the trainer encodes the data
    once into a latent cache (`ms_ddpm.latent`) and the samples are decoded; the checkpoints carry the autoencoder."""

    # the autoencoder's checkpoint: one of an `ms-ddpm train` run with model.name autoencoder_kl (its EMA weights when
    # it has them), or of scripts/convert_diffusers_vae.py; None: diffusion in pixel space
    autoencoder: Optional[str] = None
    # the diffusion model sees z * scaling_factor; auto: 1 / std of the training latents (Sec. 4.3.2), computed by
    # the trainer, or a converted diffusers VAE's own factor (0.18215 for Stable Diffusion's); a number overrides
    # either; stored in the run's config
    scaling_factor: typing.Union[float, str] = "auto"
    # the autoencoder's constructor arguments, filled in by the trainer (so sampling rebuilds it from a checkpoint)
    autoencoder_kwargs: Optional[dict] = None

    def __post_init__(self):
        s = self.scaling_factor
        if s != "auto" and (isinstance(s, (bool, str)) or not s > 0):
            raise ConfigError(f"latent.scaling_factor must be auto or a positive number, got {s!r}")


SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig, "train": TrainConfig,
            "autoencoder": AutoencoderConfig, "latent": LatentConfig}


class ConfigError(ValueError):
    """A config that cannot be used; the message says what to change."""


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
               list: "a list"}


def _checked(where, value, annotation):
    """`value` if it fits the field type `annotation` (one of _TYPE_NAMES, Optional of one, or a Union of them,
    tried in order), else a ConfigError.

    Integers pass as floats. Strings that spell a float pass as floats too: YAML 1.1 reads `1e-4` (no dot) as a
    string, and `train.lr=1e-4` should mean what it says."""
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else (annotation,)
    optional = type(None) in kinds
    kinds = [k for k in kinds if k is not type(None)]
    if value is None and optional:
        return None
    if len(kinds) > 1:
        for kind in kinds:
            try:
                return _checked(where, value, kind)
            except ConfigError:
                pass
        raise ConfigError(f"{where} must be {' or '.join(_TYPE_NAMES[k] for k in kinds)}, got {value!r} "
                          f"({type(value).__name__})")
    kind = kinds[0]
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    expected = _TYPE_NAMES[kind] + (" or null" if optional else "")
    raise ConfigError(f"{where} must be {expected}, got {value!r} ({type(value).__name__})")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)

    @classmethod
    def from_dict(cls, raw):
        """Build a Config from nested dicts, rejecting unknown sections and keys."""
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a mapping of sections {list(SECTIONS)}, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; valid sections: {list(SECTIONS)}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = raw.get(name) or {}
            valid = [f.name for f in dataclasses.fields(section_cls)]
            bad = sorted(set(values) - set(valid))
            if bad:
                raise ConfigError(f"unknown key(s) {bad} in section '{name}'; valid keys: {valid}")
            types = {f.name: f.type for f in dataclasses.fields(section_cls)}
            sections[name] = section_cls(**{k: _checked(f"{name}.{k}", v, types[k]) for k, v in values.items()})
        return cls(**sections)

    @classmethod
    def load(cls, path, overrides=()):
        """Read a YAML file (None: all defaults) and apply `key.sub=value` overrides."""
        raw = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        if not overrides:
            return cls.from_dict(raw)
        # overrides apply to the resolved config, so a key inside a mapping keeps the mapping's other entries
        resolved = cls.from_dict(raw).to_dict()
        for item in overrides:
            key, sep, value = item.partition("=")
            parts = key.split(".")
            if not sep or len(parts) < 2 or not all(parts):
                raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-4 or "
                                  "model.kwargs.dim=32")
            if parts[0] not in resolved:
                raise ConfigError(f"override {item!r}: unknown config section {parts[0]!r}; valid sections: "
                                  f"{list(SECTIONS)}")
            container = resolved[parts[0]]
            for depth, part in enumerate(parts[1:-1], start=1):
                container = container.setdefault(part, {})
                if not isinstance(container, dict):
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is not a mapping")
            try:
                container[parts[-1]] = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise ConfigError(f"override {item!r}: the value is not valid YAML ({err.problem})") from None
        return cls.from_dict(resolved)

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_yaml(self):
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
