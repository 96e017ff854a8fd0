"""Helpers shared by the tests."""
import contextlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from ms_ddpm.data.embedded import embedded_mnist_root
from ms_ddpm.schedules import timestep_sigmas

# The real MNIST digits the package carries (ms_ddpm/data/mnist5k: 4,000 train + 1,000 test), as the folder of
# unpacked IDX files that `create_dataset("mnist", root=None)` reads: the suite needs nothing beside the repository.
MNIST5K = Path(embedded_mnist_root())
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
# diffusers' attention names before version 0.15, still found in older checkpoints (converted on load)
LEGACY_ATTENTION_NAMES = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def import_torch_reference():
    """torch and diffusers, or a clean skip naming what is missing (they are test-only dependencies)."""
    torch = pytest.importorskip("torch", reason="torch is a test-only dependency: pip install -e '.[dev]'")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test-only dependency: pip install -e '.[dev]'")
    return torch, diffusers


@contextlib.contextmanager
def execution_mode(mode):
    """Run the block in GRAPH_MODE or PYNATIVE_MODE, then restore the previous mode."""
    previous = ms.get_context("mode")
    ms.set_context(mode=mode)
    try:
        yield
    finally:
        ms.set_context(mode=previous)


def assert_matches_reference(ms_out, torch_out):
    """MindSpore output equals the reference's to 1e-4 relative (absolute 1e-4 of the largest value near zero)."""
    np.testing.assert_allclose(ms_out, torch_out, rtol=1e-4, atol=1e-4 * np.abs(torch_out).max())


def legacy_attention_names(state_dict):
    """The state dict under diffusers' former attention names (query/key/value/proj_attn)."""
    renamed = {}
    for name, value in state_dict.items():
        for new, old in LEGACY_ATTENTION_NAMES.items():
            name = name.replace(new, old)
        renamed[name] = value
    return renamed


def load_script(name):
    """scripts/<name>.py as a module, to call its functions in-process."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name, *args, cwd):
    """scripts/<name>.py in a subprocess; cwd because MindSpore may leave log/kernel folders in the working folder."""
    return subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def randomise_norms_and_biases(torch, model):
    """Draw a reference torch model's norm weights from N(1, 0.1) and its biases from N(0, 0.1), in place.

    Default initialisation leaves GroupNorm and LayerNorm at weight 1 / bias 0 and most biases near 0, which would
    hide a swapped gamma/beta or a missing bias in the network compared against it. Returns the model in eval mode.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif isinstance(model.get_submodule(name.rpartition(".")[0]), (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                p.normal_(1.0, 0.1)
    return model.eval()


def assert_same_network(net, params_a, params_b, *inputs):
    """`net(*inputs)` is the same (to float32 rounding) with the weights `params_a` as with `params_b` (arrays in
    `net.trainable_params()` order); net is left in inference mode with params_b.

    Two runs that should take the same steps but round differently (graph and PyNative mode) are compared by what
    their weights compute, not weight by weight: a bias that a GroupNorm removes has rounding noise for gradient, which
    Adam's normalised update turns into steps of up to the learning rate that differ from run to run.
    """
    net.set_train(False)
    outputs = []
    for params in (params_a, params_b):
        for p, value in zip(net.trainable_params(), params, strict=True):
            p.set_data(ms.Tensor(value))
        outputs.append(net(*inputs).asnumpy())
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def alpha_bar_at(alphas_cumprod, timesteps):
    """alpha_bar at (possibly fractional) timesteps, 1 / (1 + sigma(t)^2) with `timestep_sigmas`' interpolation: the
    training table itself at integers, and what an exact model told a fractional timestep (Euler family) answers."""
    return 1.0 / (1.0 + timestep_sigmas(alphas_cumprod, timesteps) ** 2)


def numpy_state_dict(model):
    """A torch model's state dict as name -> NumPy array (copies)."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def save_diffusers_model(model, folder, weights_format):
    """Write a diffusers model as a user would find it: config.json plus `diffusion_pytorch_model.safetensors`
    ("safetensors") or a torch `.bin` under the former attention names ("legacy-bin").

    Returns (weights path, config path).
    """
    import torch

    model.save_pretrained(folder, safe_serialization=True)
    if weights_format == "safetensors":
        return folder / "diffusion_pytorch_model.safetensors", folder / "config.json"
    weights = folder / "diffusion_pytorch_model.bin"
    legacy = legacy_attention_names({k: v.detach() for k, v in model.state_dict().items()})
    assert any(name.endswith(".proj_attn.weight") for name in legacy), "the model has no attention to rename"
    torch.save(legacy, weights)
    return weights, folder / "config.json"
