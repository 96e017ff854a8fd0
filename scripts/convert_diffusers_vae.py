"""Convert a diffusers AutoencoderKL checkpoint (e.g. Stable Diffusion's VAE) into a MindSpore checkpoint.

Usage:
    python scripts/convert_diffusers_vae.py --input vae/diffusion_pytorch_model.safetensors \\
        --config vae/config.json --output sd_vae.ckpt

`--input` is a `.safetensors` file (read with `safetensors.numpy`, no torch needed) or a torch `.bin`/`.pt`/`.pth`
state dict (needs torch); `--config` is the model's diffusers `config.json` beside it. Configurations that
`ms_ddpm.models.autoencoder_kl.AutoencoderKL` cannot represent (other block types or activations, no quant convs,
a latent shift, ...) are refused with a message naming the option. The checkpoint carries the constructor
arguments as JSON under the key "autoencoder_kl", so it rebuilds the network alone:

    ckpt = ms.load_checkpoint("sd_vae.ckpt")
    vae = AutoencoderKL(**json.loads(str(ckpt.pop("autoencoder_kl"))))
    ms.load_param_into_net(vae, ckpt, strict_load=True)
"""
import argparse
import json
import sys

from ms_ddpm.models.autoencoder_kl import AutoencoderKL
from ms_ddpm.models.state_dict import (StateDictError, check_output_folder, describe, read_config,
                                      read_state_dict, report_error, save_diffusers_weights)

PROG = "convert_diffusers_vae"


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="diffusion_pytorch_model.safetensors or .bin")
    parser.add_argument("--config", required=True, help="the model's diffusers config.json")
    parser.add_argument("--output", required=True, help="MindSpore checkpoint to write (.ckpt)")
    args = parser.parse_args(argv)

    try:
        config = read_config(args.config)
        check_output_folder(args.output)
        try:
            kwargs = AutoencoderKL.diffusers_config_kwargs(config)
        except ValueError as e:
            raise StateDictError(f"{args.config}: {e}") from None
        state_dict = read_state_dict(args.input)
        net = AutoencoderKL(**kwargs)
        save_diffusers_weights(net, state_dict, args.input, args.output,
                               append_dict={"autoencoder_kl": json.dumps(kwargs)})
    except (StateDictError, ValueError) as e:
        # ValueError: AutoencoderKL rejecting the mapped arguments (e.g. widths not divisible by the groups).
        return report_error(PROG, e)
    print(f"wrote {args.output}: {describe(net, kwargs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
