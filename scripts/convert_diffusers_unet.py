"""Convert a diffusers UNet2DModel checkpoint of a DDPM network into a MindSpore checkpoint for `DDPMUNet`.

Usage:
    python scripts/convert_diffusers_unet.py --input path/to/diffusion_pytorch_model.safetensors \\
        --config path/to/config.json --output ddpm_cifar10.ckpt

    python scripts/convert_diffusers_unet.py --input diffusion_pytorch_model.bin --output ddpm_cifar10.ckpt

`--input` is a `.safetensors` file (read with `safetensors.numpy`, no torch needed) or a torch `.bin`/`.pt`/`.pth`
state dict (needs torch). `--config` is the model's diffusers `config.json` (for google/ddpm-cifar10-32 the one
next to the weights); without it the paper's CIFAR-10 configuration is used. Configurations that `DDPMUNet`
cannot represent (other block types, flipped sinusoids, symmetric downsampling padding, multi-head attention, ...)
are refused with a message. Class-conditional models (`num_class_embeds` with `class_embed_type` null: a learned
class embedding added to the time embedding) convert too. Load the result with:

    net = DDPMUNet(**kwargs)  # the configuration printed by this script
    ms.load_param_into_net(net, ms.load_checkpoint("ddpm_cifar10.ckpt"), strict_load=True)
"""
import argparse
import sys

from ms_ddpm.models.state_dict import (StateDictError, check_diffusers_options, check_output_folder, describe,
                                      read_config, read_state_dict, report_error, save_diffusers_weights)
from ms_ddpm.utils import check_int

PROG = "convert_diffusers_unet"


class ConversionError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# UNet2DModel options whose value DDPMUNet hard-wires: (diffusers default when the key is absent, required value).
_FIXED_OPTIONS = {
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
_HANDLED_OPTIONS = {
    "sample_size", "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
    "layers_per_block", "norm_num_groups", "norm_eps", "attention_head_dim", "attn_norm_num_groups",
    "time_embedding_dim", "dropout", "num_train_timesteps", "num_class_embeds",
}


def ddpm_unet_kwargs(config):
    """Map a diffusers UNet2DModel config dict to DDPMUNet keyword arguments; ConversionError if impossible."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConversionError(f"config is for {config['_class_name']}, not UNet2DModel")
    check_diffusers_options(config, "DDPMUNet", _FIXED_OPTIONS, _HANDLED_OPTIONS, ConversionError)

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


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="diffusion_pytorch_model.safetensors or .bin")
    parser.add_argument("--config", help="the model's diffusers config.json (default: DDPM CIFAR-10 paper config)")
    parser.add_argument("--output", required=True, help="MindSpore checkpoint to write (.ckpt)")
    args = parser.parse_args(argv)

    try:
        kwargs = ddpm_unet_kwargs(read_config(args.config)) if args.config else {}
        check_output_folder(args.output)
        state_dict = read_state_dict(args.input)
        # Imported only now so that argument and file errors come back without MindSpore's start-up time.
        from ms_ddpm.models.ddpm_unet import DDPMUNet

        net = DDPMUNet(**kwargs)
        save_diffusers_weights(net, state_dict, args.input, args.output)
    except (ConversionError, StateDictError, ValueError) as e:
        # ValueError: DDPMUNet rejecting the mapped configuration (e.g. indivisible sample_size).
        return report_error(PROG, e)
    print(f"wrote {args.output}: {describe(net, kwargs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
