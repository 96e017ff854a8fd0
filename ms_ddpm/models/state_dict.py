"""Reading PyTorch-side weight files (diffusers' `.safetensors`, torch `.bin` / `.pt` / `.pth` state dicts) as NumPy,
and the steps the diffusers converters in `scripts/` share (config file, output folder, strict load and save).

`torch` is imported only when a torch file is read, MindSpore only when a network is saved: ms_ddpm itself never
needs torch (diffusers' `.safetensors` files are read as NumPy, with `safetensors`, an install requirement).
"""
import json
import os
import sys


class StateDictError(ValueError):
    """A converter input that cannot be used (weight file, config file, output path); the message names the file and
    the fix."""


def read_state_dict(path):
    """name -> NumPy array (floating tensors as float32) from a `.safetensors` file or a torch state-dict file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StateDictError(f"input file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors reports corrupt files with its own exception type
            raise StateDictError(f"cannot read {path}: {e}") from None
    try:
        import torch
    except ImportError:
        raise StateDictError(f"reading {path} needs torch (pip install torch), or convert from .safetensors") from None
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        first_line = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise StateDictError(f"cannot read {path} as a torch state dict: {first_line}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise StateDictError(f"{path} holds a {type(state_dict).__name__} that is not a state dict of tensors")
    # numpy has no bfloat16; the networks are float32 anyway
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state_dict.items()}


def read_config(path):
    """A model's diffusers config.json as a dict."""
    if not os.path.isfile(path):
        raise StateDictError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise StateDictError(f"{path} is not valid JSON: {e}") from None


def check_diffusers_options(config, network, fixed, known, error=ValueError):
    """Refuse a diffusers config dict with options `network` does not know (`known` or `fixed`) or a `fixed` option
    (name -> (diffusers' default when absent, the value `network` hard-wires)) set otherwise; raises `error`."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known and k not in fixed)
    if unknown:
        raise error(f"config has options {network} does not know: {', '.join(unknown)}")
    for key, (default, required) in fixed.items():
        value = config.get(key, default)
        if value != required:
            raise error(f"{network} needs {key}={required!r}, config has {value!r}")


def check_output_folder(path):
    """Refuse an output path whose folder does not exist, before any slow work."""
    output_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(output_dir):
        raise StateDictError(f"output directory does not exist: {output_dir}")


def save_diffusers_weights(net, state_dict, input_path, output_path, append_dict=None):
    """Load a diffusers state dict read from `input_path` into `net` strictly, then save `net` to `output_path`
    (with `append_dict`'s entries, as `mindspore.save_checkpoint`)."""
    import mindspore as ms

    from .ddpm_unet import load_diffusers_weights

    try:
        load_diffusers_weights(net, state_dict)
    except ValueError as e:
        raise StateDictError(f"{input_path} does not fit {type(net).__name__}: {e}") from None
    try:
        ms.save_checkpoint(net, output_path, append_dict=append_dict)
    except OSError as e:
        raise StateDictError(f"cannot write {output_path}: {e}") from None


def describe(net, kwargs):
    """The converters' summary of what they wrote: 'N parameters, Class(arg=value, ...)'."""
    n_params = sum(p.size for p in net.get_parameters())
    arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"{n_params:,} parameters, {type(net).__name__}({arguments})"


def report_error(prog, error):
    """Print `error` as one line, `prog: error: ...`, on stderr; return 2, argparse's status for bad arguments."""
    message = " ".join(str(error).split())
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
