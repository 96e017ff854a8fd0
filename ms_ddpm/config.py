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


@dataclass
class DiffusionConfig:
    """The noise process the network is trained on (`diffusion.process`, one of `ms_ddpm.processes.PROCESSES`) and
    the settings every process shares; the process's own keys sit beside them in the same YAML section and are
    validated by the process (its `config_class`: `DDPMConfig`, `NCSNConfig`, `EDMConfig`, `FlowConfig`), so a key
    of another process is refused by name. They are read as attributes (`cfg.diffusion.num_timesteps`)."""

    process: str = "ddpm"  # ddpm | ncsn | edm | flow
    # classifier-free guidance (Ho & Salimans 2021, Algorithm 1): the probability with which training replaces a
    # class label by the null label, so one network also learns the unconditional model; class-conditional models only
    cond_drop_prob: float = 0.0
    # clip the predicted x_0 to [-1, 1] when sampling (the data's range); None: in pixel space yes, in the latent
    # space of a `latent` run no (latents are not bounded)
    clip_denoised: Optional[bool] = None
    #: the process's own keys, an instance of its config_class (filled in from the section's other keys)
    settings: object = None

    def __post_init__(self):
        processes = _processes()
        if self.process not in processes:
            raise ConfigError(f"diffusion.process must be one of {list(processes)}, got {self.process!r}")
        p = self.cond_drop_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ConfigError(f"diffusion.cond_drop_prob must be in [0, 1) (0.1 is usual), got {self.cond_drop_prob!r}")
        if self.settings is None:
            self.settings = processes[self.process].config_class()
        if self.process == "ncsn" and self.clip_denoised:
            raise ConfigError("diffusion.clip_denoised: the NCSN samplers do not clip; drop it")

    def __getattr__(self, name):
        # only for names that are not fields: the process's own keys
        settings = self.__dict__.get("settings")
        if settings is not None and name in _keys(settings):
            return getattr(settings, name)
        raise AttributeError(f"diffusion.{name} is not a key of process {self.__dict__.get('process')!r}")

    def __setattr__(self, name, value):
        settings = self.__dict__.get("settings")
        if settings is not None and name in _keys(settings):
            setattr(settings, name, value)
        else:
            object.__setattr__(self, name, value)

    @classmethod
    def from_values(cls, values, stored=False):
        """From the section's flat mapping: the shared keys, then the process's own, each checked for its type.
        `stored`: the config of a checkpoint written before processes owned their keys, which lists every key of
        processes ddpm and ncsn; the other process's keys, at their defaults there, are dropped."""
        processes = _processes()
        shared = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "settings"}
        process = values.get("process", "ddpm")
        if process not in processes:
            raise ConfigError(f"diffusion.process must be one of {list(processes)}, got {process!r}")
        own_cls = processes[process].config_class
        own = {f.name: f for f in dataclasses.fields(own_cls)}
        rest = {k: v for k, v in values.items() if k not in shared}
        if stored:
            rest = {k: v for k, v in rest.items() if k in own or not _default_elsewhere(processes, process, k, v)}
        foreign = {}
        for k in sorted(set(rest) - set(own)):
            foreign.setdefault(next((n for n, c in processes.items() if k in _keys(c.config_class)), None),
                               []).append(k)
        for other, keys in foreign.items():
            if other is None:
                raise ConfigError(f"unknown key(s) {keys} in section 'diffusion'; valid keys of process {process!r}: "
                                  f"{list(shared) + list(own)}")
            raise ConfigError(f"diffusion key(s) {keys} are settings of process {other!r} and do nothing with "
                              f"diffusion.process {process!r}: remove them, or set diffusion.process: {other}")
        try:
            settings = own_cls(**{k: _checked(f"diffusion.{k}", v, own[k].type) for k, v in rest.items()})
        except ValueError as err:  # the process's own checks
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"diffusion (process {process}): {err}") from None
        return cls(**{k: _checked(f"diffusion.{k}", v, shared[k]) for k, v in values.items() if k in shared},
                   settings=settings)

    def to_dict(self):
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"}
        return {**values, **dataclasses.asdict(self.settings)}


def _keys(config_class):
    """The key names of a process's config class (or instance)."""
    return {f.name for f in dataclasses.fields(config_class)}


def _processes():
    from .processes import PROCESSES  # the registry (imports MindSpore); config.py itself does not

    return PROCESSES


def _default_elsewhere(processes, process, key, value):
    """Whether `key` = `value` is another process's key at that process's default (see `from_values`)."""
    for name, entry in processes.items():
        fields = {f.name: f for f in dataclasses.fields(entry.config_class)}
        if name != process and key in fields and fields[key].default == value:
            return True
    return False


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


# train.* keys that may change between a run and its resumption (`Config.check_resumable`); everything else must
# match. (A new train.steps stretches the cosine schedule from the resumed step on; train.recompute changes memory
# and time, not the numbers; the samplers of grids and evaluations change what is looked at, not what is trained.)
RESUMABLE_KEYS = {"steps", "log_every", "sample_every", "save_every", "keep_checkpoints", "num_samples",
                  "max_nonfinite_steps", "output_dir", "eval_every", "recompute", "sampler", "eval_sampler"}


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
    sampler: Optional[str] = None  # sampler of the periodic grids; None: the process's own (ddpm: ddim)
    sample_steps: int = 50  # its number of steps
    # FD / KID of the EMA model against the test split while training (ms_ddpm.train.evaluation), on rank 0,
    # logged to train_log.jsonl and plotted in metrics.png; the lowest FD's checkpoint is kept as ckpt_best.ckpt
    eval_every: int = 0  # steps between evaluations (and at the last step); 0 disables
    eval_num: int = 256  # samples per evaluation (FD is biased upwards at small numbers: compare at one eval_num)
    eval_batch_size: int = 256  # samples per sampling batch
    eval_sampler: Optional[str] = None  # sampler of the evaluations; None: the process's own (ddpm: ddim, eta 0)
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
    def from_dict(cls, raw, stored=False):
        """Build a Config from nested dicts, rejecting unknown sections and keys; `stored`: a checkpoint's config
        (`DiffusionConfig.from_values`)."""
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a mapping of sections {list(SECTIONS)}, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; valid sections: {list(SECTIONS)}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = raw.get(name) or {}
            if section_cls is DiffusionConfig:
                if not isinstance(values, dict):
                    raise ConfigError(f"section 'diffusion' must be a mapping, got {type(values).__name__}")
                sections[name] = DiffusionConfig.from_values(values, stored)
                continue
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
        # overrides apply to the resolved config, so a key inside a mapping keeps the mapping's other entries; the
        # diffusion section keeps only the keys the file sets, so an override may change diffusion.process
        resolved = cls.from_dict(raw).to_dict()
        resolved["diffusion"] = dict(raw.get("diffusion") or {})
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

    @classmethod
    def from_stored(cls, text):
        """The config a checkpoint stores (its YAML text)."""
        return cls.from_dict(yaml.safe_load(str(text)), stored=True)

    def check_resumable(self, stored):
        """Refuse to resume, with this config, a checkpoint whose stored config (YAML text) differs from it in
        anything but RESUMABLE_KEYS."""
        saved, current = Config.from_stored(stored).to_dict(), self.to_dict()
        diffs = [f"{s}.{k}: checkpoint {saved[s][k]!r} vs now {current[s][k]!r}"
                 for s in current for k in current[s]
                 if current[s][k] != saved[s][k] and not (s == "train" and k in RESUMABLE_KEYS)]
        if diffs:
            raise ConfigError("cannot resume: the config differs from the checkpoint's in " + "; ".join(diffs)
                              + ". Use the checkpoint's config (config.yaml in the run folder) or a new output_dir.")

    def to_dict(self):
        return {f.name: (getattr(self, f.name).to_dict() if f.name == "diffusion" else
                         dataclasses.asdict(getattr(self, f.name))) for f in dataclasses.fields(self)}

    def to_yaml(self):
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
