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
import os
import sys

from ms_ddpm.models.state_dict import StateDictError, read_state_dict

PROG = "convert_diffusers_vae"


class ConversionError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="diffusion_pytorch_model.safetensors or .bin")
    parser.add_argument("--config", required=True, help="the model's diffusers config.json")
    parser.add_argument("--output", required=True, help="MindSpore checkpoint to write (.ckpt)")
    args = parser.parse_args(argv)

    try:
        if not os.path.isfile(args.config):
            raise ConversionError(f"config file not found: {args.config}")
        try:
            with open(args.config, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{args.config} is not valid JSON: {e}") from None
        output_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(output_dir):
            raise ConversionError(f"output directory does not exist: {output_dir}")
        # Imported only now so that argument and file errors come back without MindSpore's start-up time.
        import mindspore as ms

        from ms_ddpm.models.autoencoder_kl import AutoencoderKL
        from ms_ddpm.models.ddpm_unet import load_diffusers_weights

        try:
            kwargs = AutoencoderKL.diffusers_config_kwargs(config)
        except ValueError as e:
            raise ConversionError(f"{args.config}: {e}") from None
        state_dict = read_state_dict(args.input)
        net = AutoencoderKL(**kwargs)
        try:
            load_diffusers_weights(net, state_dict)
        except ValueError as e:
            raise ConversionError(f"{args.input} does not fit {args.config}: {e}") from None
        try:
            ms.save_checkpoint(net, args.output, append_dict={"autoencoder_kl": json.dumps(kwargs)})
        except OSError as e:
            raise ConversionError(f"cannot write {args.output}: {e}") from None
    except (ConversionError, StateDictError, ValueError) as e:
        # ValueError: AutoencoderKL rejecting the mapped arguments (e.g. widths not divisible by the groups).
        message = " ".join(str(e).split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2  # argparse's status for bad arguments: the input is one

    n_params = sum(p.size for p in net.get_parameters())
    arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    print(f"wrote {args.output}: {n_params:,} parameters, AutoencoderKL({arguments})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
