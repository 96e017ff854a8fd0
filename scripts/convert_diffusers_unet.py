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

The configuration's mapping is `ms_ddpm.diffusers_format.ddpm_unet_kwargs`, which `ms-ddpm export` inverts; a whole
diffusers DDPMPipeline folder (unet/ and scheduler/) needs no conversion: `DiffusionPipeline.from_pretrained` reads it.
"""
import argparse
import sys

from ms_ddpm.diffusers_format import ConversionError, ddpm_unet_kwargs
from ms_ddpm.models.ddpm_unet import DDPMUNet
from ms_ddpm.models.state_dict import (StateDictError, check_output_folder, describe, read_config, read_state_dict,
                                      report_error, save_diffusers_weights)

PROG = "convert_diffusers_unet"


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
        net = DDPMUNet(**kwargs)
        save_diffusers_weights(net, state_dict, args.input, args.output)
    except (ConversionError, StateDictError, ValueError) as e:
        # ValueError: DDPMUNet rejecting the mapped configuration (e.g. indivisible sample_size).
        return report_error(PROG, e)
    print(f"wrote {args.output}: {describe(net, kwargs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
