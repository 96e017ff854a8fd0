"""diffusers' folder format, both ways: `UNet2DModel` configs against `DDPMUNet`'s arguments, `DDPMScheduler`
configs against the `diffusion` section, and the files of a `DDPMPipeline` folder.

    model_index.json                              {"_class_name": "DDPMPipeline", "unet": [...], "scheduler": [...]}
    unet/config.json                              UNet2DModel's arguments
    unet/diffusion_pytorch_model.safetensors      its weights under diffusers' names
    scheduler/scheduler_config.json               DDPMScheduler's arguments: the training chain

`ms_ddpm.export` writes such folders (and an autoencoder's vae/), `DiffusionPipeline.from_pretrained` reads them, a
downloaded google/ddpm-cifar10-32 as well; scripts/convert_diffusers_unet.py maps a UNet2DModel config with the
same tables. A setting that one side cannot represent is refused with a `ConversionError` naming it: UNet2DModel
options `DDPMUNet` hard-wires (flipped sinusoids, symmetric downsampling padding, multi-head attention, other block
types, ...), trained or zero-SNR betas, unbounded learned variances (`learned`; `learned_range` is read and
written), thresholding, another process than a DDPM chain.

Weights are read and written with `safetensors.numpy`: no torch (a torch `.bin` is read only where torch is
installed, by `models.state_dict.read_state_dict`).
"""
import json
from pathlib import Path

from safetensors.numpy import save_file

from .config import Config, ConfigError
from .models.ddpm_unet import DDPMUNet
from .models.state_dict import check_diffusers_options, read_config, read_state_dict
from .utils import check_int, constructor_arguments

__all__ = ["ConversionError", "ddpm_unet_kwargs", "unet2d_config", "ddpm_scheduler_config", "diffusion_section",
           "read_ddpm_pipeline", "write_ddpm_pipeline", "write_model"]

UNET, SCHEDULER, VAE = "unet", "scheduler", "vae"  # the folders of a pipeline's components
WEIGHTS = "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS = "diffusion_pytorch_model.bin"  # torch pickles, as google/ddpm-cifar10-32 was first published
MODEL_INDEX = {"_class_name": "DDPMPipeline", UNET: ["diffusers", "UNet2DModel"],
               SCHEDULER: ["diffusers", "DDPMScheduler"]}


class ConversionError(ConfigError):
    """A diffusers setting ms_ddpm cannot represent, or the other way round; the message names it."""


# UNet2DModel options whose value DDPMUNet hard-wires: (diffusers default when the key is absent, required value).
_UNET_FIXED = {
    "time_embedding_type": ("positional", "positional"),
    "flip_sin_to_cos": (True, False),
    "freq_shift": (0, 1),
    "downsample_padding": (1, 0),
    "act_fn": ("silu", "silu"),
    "center_input_sample": (False, False),
    "mid_block_scale_factor": (1, 1),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
    "resnet_time_scale_shift": ("default", "default"),
    "downsample_type": ("conv", "conv"),
    "upsample_type": ("conv", "conv"),
    "add_attention": (True, True),
    "class_embed_type": (None, None),
}
# Options that are read below, or that do not change the weights or the computation at inference.
_UNET_OPTIONS = {
    "sample_size", "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
    "layers_per_block", "norm_num_groups", "norm_eps", "attention_head_dim", "attn_norm_num_groups",
    "time_embedding_dim", "dropout", "num_train_timesteps", "num_class_embeds",
}


def ddpm_unet_kwargs(config):
    """Map a diffusers UNet2DModel config dict to DDPMUNet keyword arguments; ConversionError if impossible."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConversionError(f"config is for {config['_class_name']}, not UNet2DModel")
    check_diffusers_options(config, "DDPMUNet", _UNET_FIXED, _UNET_OPTIONS, ConversionError)

    widths = list(config.get("block_out_channels", (224, 448, 672, 896)))
    down_types = list(config.get("down_block_types",
                                 ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")))
    up_types = list(config.get("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")))
    if not widths or len(down_types) != len(widths) or len(up_types) != len(widths):
        raise ConversionError("block_out_channels, down_block_types and up_block_types must have the same length")
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ConversionError(f"block_out_channels {widths} are not multiples of the first width {ch}")
    bad = [t for t in down_types if t not in ("DownBlock2D", "AttnDownBlock2D")]
    bad += [t for t in up_types if t not in ("UpBlock2D", "AttnUpBlock2D")]
    if bad:
        raise ConversionError(f"unsupported block types {bad}; DDPMUNet has (Attn)DownBlock2D and (Attn)UpBlock2D")
    attn_levels = [i for i, t in enumerate(down_types) if t == "AttnDownBlock2D"]
    up_attn_levels = sorted(len(widths) - 1 - i for i, t in enumerate(up_types) if t == "AttnUpBlock2D")
    if attn_levels != up_attn_levels:
        raise ConversionError(f"attention at encoder levels {attn_levels} but at decoder levels {up_attn_levels}; "
                              "DDPMUNet mirrors the encoder's attention levels")

    sample_size = config.get("sample_size")
    if isinstance(sample_size, (list, tuple)):
        if len(set(sample_size)) != 1:
            raise ConversionError(f"non-square sample_size {sample_size} is not supported")
        sample_size = sample_size[0]
    if not isinstance(sample_size, int):
        raise ConversionError(f"config needs an integer sample_size, has {sample_size!r}")

    groups = config.get("norm_num_groups", 32)
    if config.get("attn_norm_num_groups") not in (None, groups):
        raise ConversionError("attn_norm_num_groups must equal norm_num_groups")
    if config.get("time_embedding_dim") not in (None, 4 * ch):
        raise ConversionError(f"time_embedding_dim must be 4 * block_out_channels[0] = {4 * ch}")
    # DDPM's attention is single-head; diffusers' head count is channels // attention_head_dim (None: one head).
    head_dim = config.get("attention_head_dim", 8)
    attn_widths = [widths[i] for i in attn_levels] + [widths[-1]]
    if head_dim is not None and any(w != head_dim for w in attn_widths):
        raise ConversionError(f"attention_head_dim={head_dim} gives multi-head attention; DDPMUNet is single-head "
                              "(attention_head_dim null, or equal to the attention blocks' width)")

    kwargs = dict(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=config.get("layers_per_block", 2),
        attn_resolutions=tuple(sample_size // 2 ** i for i in attn_levels),
        image_size=sample_size,
        dropout=config.get("dropout", 0.0),
        num_groups=groups,
        eps=config.get("norm_eps", 1e-5),
    )
    # a class-conditional model: its class_embedding table (K rows, added to the time embedding)
    num_class_embeds = config.get("num_class_embeds")
    if num_class_embeds is not None:
        kwargs["num_class_embeds"] = check_int("num_class_embeds", num_class_embeds, 1)
    return kwargs


def unet2d_config(kwargs):
    """The UNet2DModel config dict (config.json) of a DDPMUNet with constructor arguments `kwargs` (missing ones at
    DDPMUNet's defaults): the inverse of `ddpm_unet_kwargs`."""
    args = constructor_arguments(DDPMUNet, kwargs)
    ch, size = args["ch"], args["image_size"]
    attention = [size // 2 ** level in args["attn_resolutions"] for level in range(len(args["ch_mult"]))]
    config = {
        "_class_name": "UNet2DModel",
        "sample_size": size,
        "in_channels": args["in_channels"],
        "out_channels": args["in_channels"] if args["out_channels"] is None else args["out_channels"],
        "block_out_channels": [ch * m for m in args["ch_mult"]],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "layers_per_block": args["num_res_blocks"],
        "norm_num_groups": args["num_groups"],
        "norm_eps": args["eps"],
        "dropout": args["dropout"],
        "attention_head_dim": None,  # one head per attention block
        "num_class_embeds": args["num_class_embeds"],
    }
    config.update({key: required for key, (_, required) in _UNET_FIXED.items()})
    return config


# ms_ddpm's names -> DDPMScheduler's, of the beta schedules (ms_ddpm.schedules), objectives and reverse variances
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "quadratic": "scaled_linear",
                  "sigmoid": "sigmoid"}
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_large": "fixed_large", "learned_range": "learned_range"}
# DDPMScheduler options ms_ddpm's chain hard-wires: (diffusers default when the key is absent, required value)
_SCHEDULER_FIXED = {
    "trained_betas": (None, None),
    "thresholding": (False, False),
    "clip_sample_range": (1.0, 1.0),
    "rescale_betas_zero_snr": (False, False),
}
# Options read below, or choices of diffusers' sampling loop that ms_ddpm's samplers make themselves (which
# timesteps a shortened chain visits) or that act only with thresholding.
_SCHEDULER_OPTIONS = {
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "variance_type",
    "clip_sample", "timestep_spacing", "steps_offset", "dynamic_thresholding_ratio", "sample_max_value",
}


def _translate(table, value, what, side):
    """table[value], or a ConversionError saying that `side` has no counterpart of the `what` named `value`."""
    if value not in table:
        raise ConversionError(f"{what} {value!r} has no counterpart in {side}; those with one: {list(table)}")
    return table[value]


def ddpm_scheduler_config(diffusion, clip_sample):
    """The DDPMScheduler config dict (scheduler_config.json) of a run's `DiffusionConfig`, whose samplers clip x_0
    when `clip_sample` (its `create_process(...).clip_denoised`)."""
    d = diffusion
    if d.process != "ddpm":
        raise ConversionError(f"diffusion.process {d.process!r} has no diffusers scheduler: DDPMScheduler is the "
                              "DDPM chain (process ddpm)")
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": d.num_timesteps,
        "beta_schedule": _translate(BETA_SCHEDULES, d.beta_schedule, "diffusion.beta_schedule", "DDPMScheduler"),
        "beta_start": d.beta_start,
        "beta_end": d.beta_end,
        "prediction_type": _translate(PREDICTION_TYPES, d.objective, "diffusion.objective", "DDPMScheduler"),
        "variance_type": _translate(VARIANCE_TYPES, d.variance_type, "diffusion.variance_type", "DDPMScheduler"),
        "clip_sample": bool(clip_sample),
        **{key: required for key, (_, required) in _SCHEDULER_FIXED.items()},
    }


def diffusion_section(config):
    """The `diffusion` section (a dict) of a DDPMScheduler config dict: the inverse of `ddpm_scheduler_config`."""
    if config.get("_class_name", "DDPMScheduler") != "DDPMScheduler":
        raise ConversionError(f"scheduler config is for {config['_class_name']}, not DDPMScheduler")
    check_diffusers_options(config, "ms_ddpm's DDPM chain", _SCHEDULER_FIXED, _SCHEDULER_OPTIONS, ConversionError)

    def ours(table, key, default):
        return _translate({theirs: mine for mine, theirs in table.items()}, config.get(key, default), key, "ms_ddpm")

    return {
        "process": "ddpm",
        "num_timesteps": config.get("num_train_timesteps", 1000),
        "beta_schedule": ours(BETA_SCHEDULES, "beta_schedule", "linear"),
        "beta_start": config.get("beta_start", 1e-4),
        "beta_end": config.get("beta_end", 0.02),
        "objective": ours(PREDICTION_TYPES, "prediction_type", "epsilon"),
        "variance_type": ours(VARIANCE_TYPES, "variance_type", "fixed_small"),
        "clip_denoised": bool(config.get("clip_sample", True)),
    }


# --- folders ---------------------------------------------------------------------------------------------------
def write_json(path, content):
    """`content` as indented JSON, diffusers' config files' format."""
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_model(folder, config, state_dict):
    """A diffusers model folder (made if need be): config.json and its weights (name -> np.ndarray) as
    diffusion_pytorch_model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", config)
    # "format": "pt", as diffusers' save_pretrained writes: the tensors are PyTorch's (out, in[, kh, kw]) layout
    save_file(state_dict, str(folder / WEIGHTS), metadata={"format": "pt"})


def write_ddpm_pipeline(folder, unet_config, scheduler_config, state_dict):
    """A DDPMPipeline folder: model_index.json, unet/ and scheduler/."""
    folder = Path(folder)
    write_model(folder / UNET, unet_config, state_dict)
    (folder / SCHEDULER).mkdir(exist_ok=True)
    write_json(folder / SCHEDULER / "scheduler_config.json", scheduler_config)
    write_json(folder / "model_index.json", MODEL_INDEX)


def read_ddpm_pipeline(folder):
    """(Config, the UNet's diffusers state dict) of a DDPMPipeline folder.

    The Config has model.name ddpm_unet with the arguments of unet/config.json, the diffusion section of
    scheduler/scheduler_config.json and data.image_size / channels from the UNet's sample_size / in_channels. A
    class-conditional UNet (num_class_embeds K) gets the class names "0" ... "K-1" and no label dropout: a diffusers
    folder names neither its classes nor a null label.

    Raises:
        StateDictError: a file is missing or unreadable.
        ConversionError: a setting ms_ddpm cannot represent.
    """
    folder = Path(folder)
    index = read_config(folder / "model_index.json")
    if index.get("_class_name") != "DDPMPipeline":
        raise ConversionError(f"{folder} holds a {index.get('_class_name')!r} pipeline; ms_ddpm reads DDPMPipeline "
                              "folders (unet/ UNet2DModel, scheduler/ DDPMScheduler)")
    try:
        kwargs = ddpm_unet_kwargs(read_config(folder / UNET / "config.json"))
        diffusion = diffusion_section(read_config(folder / SCHEDULER / "scheduler_config.json"))
    except ConversionError as err:
        raise ConversionError(f"{folder}: {err}") from None
    # a learned variance's network outputs the prediction and its variance (`ms_ddpm.processes.split_output`)
    expected = kwargs["in_channels"] * (2 if diffusion["variance_type"] == "learned_range" else 1)
    if kwargs["out_channels"] != expected:
        raise ConversionError(f"{folder}: the UNet has {kwargs['out_channels']} output channels for "
                              f"{kwargs['in_channels']} input channels and variance_type "
                              f"{diffusion['variance_type']!r}; ms_ddpm's samplers take {expected}")
    weights = folder / UNET / WEIGHTS
    if not weights.is_file() and (folder / UNET / LEGACY_WEIGHTS).is_file():
        weights = folder / UNET / LEGACY_WEIGHTS
    rows = kwargs.get("num_class_embeds")
    cfg = Config.from_dict({
        # lists, not tuples: the config is written as YAML (safe_dump) into anything saved from it
        "model": {"name": "ddpm_unet", "kwargs": {k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in kwargs.items()}},
        "diffusion": diffusion,
        # what the images were is not in the folder: "folder" data of their size
        "data": {"name": "folder", "image_size": kwargs["image_size"], "channels": kwargs["in_channels"],
                 "class_names": None if rows is None else [str(i) for i in range(rows)]},
    })
    return cfg, read_state_dict(weights)

