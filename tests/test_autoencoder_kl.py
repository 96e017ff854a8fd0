"""AutoencoderKL against diffusers' AutoencoderKL on the same weights, its posterior's KL term, and the converter.

The reference is a tiny random diffusers AutoencoderKL with two levels (in, out and latent channels all different,
so that a swapped argument shows); the weights go through the same conversion as a published checkpoint.
"""
import json

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy import integrate

from ms_ddpm.models.autoencoder_kl import AutoencoderKL, kl_standard_normal, sample_posterior
from ms_ddpm.models.ddpm_unet import convert_diffusers_state_dict, load_diffusers_weights
from tests.helpers import assert_matches_reference as assert_matches
from tests.helpers import (execution_mode, import_torch_reference, load_script, numpy_state_dict,
                           randomise_norms_and_biases, run_script, save_diffusers_model)

CONVERTER = "convert_diffusers_vae"

TINY_DIFFUSERS_CONFIG = dict(
    in_channels=3, out_channels=2, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1, latent_channels=3,
    norm_num_groups=4, sample_size=8,
)
TINY_KWARGS = dict(in_channels=3, out_channels=2, block_out_channels=(16, 32), layers_per_block=1, latent_channels=3,
                   norm_num_groups=4, scaling_factor=0.18215)
# The config.json of Stable Diffusion 1.x/2.x's VAE (as in stabilityai/sd-vae-ft-mse); SDXL's adds
# "force_upcast": true and "scaling_factor": 0.13025.
SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.4.2", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# Parameters of that VAE, counted on diffusers' AutoencoderKL(**SD_VAE_CONFIG).
SD_VAE_PARAMETER_COUNT = 83_653_863


class EncodeDecode(ms.nn.Cell):
    """encode(x), decode(z) and the reconstruction of x in one Cell, so that GRAPH_MODE compiles them once."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def construct(self, x, z):
        mean, logvar = self.vae.encode(x)
        return mean, logvar, self.vae.decode(z), self.vae(x)


@pytest.fixture(scope="module")
def reference():
    """Tiny random diffusers AutoencoderKL, its numpy state dict, inputs and its outputs."""
    torch, diffusers = import_torch_reference()
    torch.manual_seed(0)
    model = randomise_norms_and_biases(torch, diffusers.AutoencoderKL(**TINY_DIFFUSERS_CONFIG))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    z = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(x)).latent_dist
        outputs = dict(mean=posterior.mean.numpy(), logvar=posterior.logvar.numpy(), kl=posterior.kl().numpy(),
                       decoded=model.decode(torch.from_numpy(z)).sample.numpy(),
                       reconstruction=model(torch.from_numpy(x)).sample.numpy())
    state_dict = numpy_state_dict(model)
    return dict(model=model, state_dict=state_dict, x=x, z=z, **outputs)


@pytest.fixture(scope="module")
def converted(reference):
    """The reference weights in an AutoencoderKL built from the reference's own config, wrapped for one graph."""
    vae = AutoencoderKL.from_diffusers_config(dict(reference["model"].config))
    load_diffusers_weights(vae, reference["state_dict"])
    vae.set_train(False)
    return EncodeDecode(vae)


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def test_matches_diffusers(reference, converted, mode):
    with execution_mode(mode):
        mean, logvar, decoded, reconstruction = (
            out.asnumpy() for out in converted(ms.Tensor(reference["x"]), ms.Tensor(reference["z"])))
    assert mean.shape == logvar.shape == (2, 3, 4, 4) and decoded.shape == reconstruction.shape == (2, 2, 8, 8)
    assert_matches(mean, reference["mean"])
    assert_matches(logvar, reference["logvar"])
    assert_matches(decoded, reference["decoded"])
    assert_matches(reconstruction, reference["reconstruction"])
    kl = kl_standard_normal(ms.Tensor(mean), ms.Tensor(logvar)).asnumpy()
    np.testing.assert_allclose(kl, reference["kl"], rtol=1e-4)


def test_from_diffusers_config_maps_stable_diffusion_vae():
    kwargs = AutoencoderKL.diffusers_config_kwargs(SD_VAE_CONFIG)
    assert kwargs == dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                          latent_channels=4, norm_num_groups=32, scaling_factor=0.18215)
    sdxl = AutoencoderKL.diffusers_config_kwargs({**SD_VAE_CONFIG, "force_upcast": True, "scaling_factor": 0.13025})
    assert sdxl["scaling_factor"] == 0.13025


def test_stable_diffusion_layout_has_diffusers_names_and_count():
    vae = AutoencoderKL.from_diffusers_config(SD_VAE_CONFIG)
    assert sum(p.size for p in vae.get_parameters()) == SD_VAE_PARAMETER_COUNT
    try:
        import torch  # noqa: F401
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    except ImportError:
        return  # the count above is the diffusers model's; the name check below needs the reference library
    reference = DiffusersAutoencoderKL(**{k: v for k, v in SD_VAE_CONFIG.items() if not k.startswith("_")})
    # the same names and shapes after conversion, so published weights load without a name map
    converted = convert_diffusers_state_dict(reference.state_dict())
    assert {k: v.shape for k, v in converted.items()} == {p.name: tuple(p.shape) for p in vae.get_parameters()}


@pytest.mark.parametrize("change, message", [
    (dict(act_fn="gelu"), "act_fn"),
    (dict(down_block_types=["AttnDownEncoderBlock2D"] * 4), "down_block_types"),
    (dict(up_block_types=["UpDecoderBlock2D"] * 3), "up_block_types"),
    (dict(shift_factor=0.0609), "shift_factor"),
    (dict(use_quant_conv=False), "use_quant_conv"),
    (dict(mid_block_add_attention=False), "mid_block_add_attention"),
    (dict(latents_mean=[0.0] * 4), "latents_mean"),
    (dict(norm_type="spatial"), "does not know: norm_type"),
    (dict(_class_name="VQModel"), "not AutoencoderKL"),
])
def test_from_diffusers_config_refuses_what_it_cannot_represent(change, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderKL.from_diffusers_config({**SD_VAE_CONFIG, **change})


def test_input_size_not_divisible(converted):
    with pytest.raises(ValueError, match="multiples of 2"):
        converted.vae.encode(ms.Tensor(np.zeros((1, 3, 7, 8), np.float32)))


def test_kl_closed_form_against_integration():
    """KL(N(mu, s^2) || N(0, 1)) = integral of q log(q / p), by quadrature, element by element, then summed."""
    rng = np.random.default_rng(1)
    mean = rng.normal(0.0, 1.5, (2, 1, 2, 2))
    logvar = rng.uniform(-4.0, 2.0, (2, 1, 2, 2))

    def kl_by_quadrature(mu, lv):
        s = np.exp(0.5 * lv)

        def integrand(z):
            log_q = -0.5 * ((z - mu) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
            log_p = -0.5 * z**2 - 0.5 * np.log(2 * np.pi)
            return np.exp(log_q) * (log_q - log_p)

        return integrate.quad(integrand, mu - 20 * s, mu + 20 * s, epsabs=1e-12, limit=200)[0]

    expected = np.vectorize(kl_by_quadrature)(mean, logvar).sum(axis=(1, 2, 3))
    kl = kl_standard_normal(ms.Tensor(mean, ms.float32), ms.Tensor(logvar, ms.float32)).asnumpy()
    assert kl.shape == (2,)
    np.testing.assert_allclose(kl, expected, rtol=1e-5)


def test_posterior_samples_have_the_posterior_moments():
    mean = np.array([1.5, -2.0, 0.0], np.float32).reshape(1, 3, 1, 1)
    logvar = np.log(np.array([0.25, 4.0, 1.0], np.float32)).reshape(1, 3, 1, 1)
    noise = np.random.default_rng(2).standard_normal((20000, 3, 1, 1)).astype(np.float32)
    z = sample_posterior(ms.Tensor(np.repeat(mean, 20000, 0)), ms.Tensor(np.repeat(logvar, 20000, 0)),
                         ms.Tensor(noise)).asnumpy()
    np.testing.assert_allclose(z.mean(axis=0).ravel(), mean.ravel(), atol=0.05)  # 4 standard errors at most
    np.testing.assert_allclose(z.std(axis=0).ravel(), [0.5, 2.0, 1.0], rtol=0.03)


def test_logvar_clamped_like_diffusers(reference):
    """A log-variance channel driven far outside [-30, 20] comes back clamped, and the KL stays finite."""
    vae = AutoencoderKL(**TINY_KWARGS)
    load_diffusers_weights(vae, reference["state_dict"])
    vae.set_train(False)
    weight, bias = vae.quant_conv.weight.asnumpy(), vae.quant_conv.bias.asnumpy()
    weight[3:] = 0.0  # output channels 3..5 are the log-variance
    bias[3:] = [100.0, -100.0, 5.0]
    vae.quant_conv.weight.set_data(ms.Tensor(weight))
    vae.quant_conv.bias.set_data(ms.Tensor(bias))
    mean, logvar = vae.encode(ms.Tensor(reference["x"]))
    logvar = logvar.asnumpy()
    np.testing.assert_array_equal(logvar[:, 0], 20.0)
    np.testing.assert_array_equal(logvar[:, 1], -30.0)
    np.testing.assert_allclose(logvar[:, 2], 5.0)
    assert np.isfinite(kl_standard_normal(mean, ms.Tensor(logvar)).asnumpy()).all()


@pytest.mark.parametrize("weights_format", ["safetensors", "legacy-bin"])
def test_converter_script_end_to_end(reference, tmp_path, weights_format):
    import_torch_reference()
    weights, config = save_diffusers_model(reference["model"], tmp_path / "vae", weights_format)
    output = tmp_path / "vae.ckpt"
    result = run_script(CONVERTER, "--input", str(weights), "--config", str(config),
                        "--output", str(output), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "AutoencoderKL(" in result.stdout

    # the checkpoint alone rebuilds the network
    ckpt = ms.load_checkpoint(str(output))
    vae = AutoencoderKL(**json.loads(str(ckpt.pop("autoencoder_kl"))))
    not_loaded, unused = ms.load_param_into_net(vae, ckpt, strict_load=True)
    assert not_loaded == [] and unused == []
    vae.set_train(False)
    mean, logvar = vae.encode(ms.Tensor(reference["x"]))
    assert_matches(mean.asnumpy(), reference["mean"])
    assert_matches(logvar.asnumpy(), reference["logvar"])
    assert_matches(vae.decode(ms.Tensor(reference["z"])).asnumpy(), reference["decoded"])


def test_converter_refuses_unrepresentable_config(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**SD_VAE_CONFIG, "shift_factor": 0.0609}))
    result = run_script(CONVERTER, "--input", str(tmp_path / "absent.safetensors"), "--config", str(config),
                        "--output", str(tmp_path / "x.ckpt"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "shift_factor" in result.stderr, result.stderr
    assert not (tmp_path / "x.ckpt").exists()


def test_converter_mismatched_keys(reference, tmp_path):
    weights = tmp_path / "model.safetensors"
    save_file(reference["state_dict"], str(weights))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(TINY_DIFFUSERS_CONFIG, layers_per_block=2)))  # one ResNet block too many
    result = run_script(CONVERTER, "--input", str(weights), "--config", str(config),
                        "--output", str(tmp_path / "x.ckpt"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "missing" in result.stderr and "encoder.down_blocks.0.resnets.1.conv1.weight" in result.stderr


@pytest.mark.parametrize("problem", ["missing config", "invalid json", "missing weights", "no output folder"])
def test_converter_file_errors(tmp_path, problem, capsys):
    config = tmp_path / "config.json"
    config.write_text("{not json" if problem == "invalid json" else json.dumps(TINY_DIFFUSERS_CONFIG))
    if problem == "missing config":
        config = tmp_path / "absent.json"
    output = tmp_path / ("absent_dir/x.ckpt" if problem == "no output folder" else "x.ckpt")
    status = load_script(CONVERTER).main(["--input", str(tmp_path / "absent.safetensors"), "--config", str(config),
                                           "--output", str(output)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    expected = {"missing config": "config file not found", "invalid json": "is not valid JSON",
                "missing weights": "input file not found", "no output folder": "output directory does not exist"}
    assert expected[problem] in err
