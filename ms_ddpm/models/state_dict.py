"""Reading PyTorch-side weight files (diffusers' `.safetensors`, torch `.bin` / `.pt` / `.pth` state dicts) as NumPy.

Used by the converters in `scripts/`. `safetensors` and `torch` are imported only when a file of their format is
read: ms_ddpm itself needs neither.
"""
import os


class StateDictError(ValueError):
    """A weight file that cannot be read as a state dict; the message names the file and the fix."""


def read_state_dict(path):
    """name -> NumPy array (floating tensors as float32) from a `.safetensors` file or a torch state-dict file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StateDictError(f"input file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise StateDictError(f"reading {path} needs safetensors (pip install safetensors)") from None
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
