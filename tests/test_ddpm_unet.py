"""DDPMUNet against diffusers' UNet2DModel, and the diffusers -> MindSpore checkpoint converter.

The comparisons use a tiny random UNet2DModel with the DDPM options (3 levels, attention on the middle one, so that
both an attention level with a downsampler and one with an upsampler are exercised); weights go through the same
conversion as the published google/ddpm-cifar10-32 checkpoint.
"""
import json

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import save_file

from ms_ddpm.models.ddpm_unet import DDPMUNet, convert_diffusers_state_dict, load_diffusers_weights
from tests.helpers import assert_matches_reference as assert_matches
from tests.helpers import (execution_mode, legacy_attention_names, load_script, numpy_state_dict,
                           randomise_norms_and_biases, run_script, save_diffusers_model)

# Parameter count of google/ddpm-cifar10-32 ("35.7 million" in Ho et al. 2020, Appendix B).
PAPER_PARAMETER_COUNT = 35_746_307

PAPER_DIFFUSERS_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
    norm_num_groups=32, norm_eps=1e-6, act_fn="silu", time_embedding_type="positional", flip_sin_to_cos=False,
    freq_shift=1, downsample_padding=0, attention_head_dim=None, mid_block_scale_factor=1, center_input_sample=False,
)
TINY_DIFFUSERS_CONFIG = dict(
    PAPER_DIFFUSERS_CONFIG, sample_size=8, block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8,
)
# The same network in DDPMUNet's paper-style arguments (levels at 8, 4, 2 pixels; attention at 4).
TINY_KWARGS = dict(in_channels=3, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8,
                   dropout=0.0, num_groups=8)

@pytest.fixture(params=[ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def mode(request):
    with execution_mode(request.param):
        yield request.param


def count_parameters(net):
    return sum(int(np.prod(p.shape)) for p in net.get_parameters())


@pytest.fixture(scope="module")
def reference():
    """Tiny random diffusers UNet2DModel, its numpy state dict, an input batch and its output."""
    torch = pytest.importorskip("torch", reason="torch is needed for the diffusers reference")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the reference UNet2DModel")
    torch.manual_seed(0)
    model = randomise_norms_and_biases(torch, diffusers.UNet2DModel(**TINY_DIFFUSERS_CONFIG))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    t = np.array([3, 917], dtype=np.int64)
    with torch.no_grad():
        out = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    state_dict = numpy_state_dict(model)
    return dict(model=model, state_dict=state_dict, x=x, t=t, out=out)


@pytest.fixture(scope="module")
def converted_net(reference):
    """DDPMUNet with the reference weights, built once so that graph mode compiles once."""
    net = load_diffusers_weights(DDPMUNet(**TINY_KWARGS), reference["state_dict"])
    net.set_train(False)
    return net


@pytest.fixture(scope="module")
def random_net():
    net = DDPMUNet(**TINY_KWARGS)
    net.set_train(False)
    return net


def test_paper_config_has_published_parameter_count():
    net = DDPMUNet()
    assert count_parameters(net) == PAPER_PARAMETER_COUNT
    try:
        import torch  # noqa: F401
        from diffusers import UNet2DModel
    except ImportError:
        return  # the count above is the published number; the cross-check below needs the reference library
    reference = UNet2DModel(**PAPER_DIFFUSERS_CONFIG)
    assert sum(p.numel() for p in reference.parameters()) == PAPER_PARAMETER_COUNT
    # Same names too, so the published checkpoint loads without a name map.
    converted = convert_diffusers_state_dict({k: v.numpy() for k, v in reference.state_dict().items()})
    assert {k: v.shape for k, v in converted.items()} == {p.name: tuple(p.shape) for p in net.get_parameters()}


def test_matches_diffusers(reference, converted_net, mode):
    out = converted_net(ms.Tensor(reference["x"]), ms.Tensor(reference["t"])).asnumpy()
    assert out.shape == (2, 3, 8, 8)
    assert_matches(out, reference["out"])


@pytest.fixture(scope="module")
def class_reference():
    """The tiny UNet2DModel with a class embedding of 10 rows (diffusers' num_class_embeds, class_embed_type None),
    randomly initialised, norms and biases included (as the unconditional reference), its state dict, a labelled
    input batch and its output."""
    torch = pytest.importorskip("torch", reason="torch is needed for the diffusers reference")
    diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the reference UNet2DModel")
    torch.manual_seed(1)
    model = randomise_norms_and_biases(torch, diffusers.UNet2DModel(**TINY_DIFFUSERS_CONFIG, num_class_embeds=10))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    t = np.array([5, 500, 990], dtype=np.int64)
    labels = np.array([3, 9, 0], dtype=np.int32)
    with torch.no_grad():
        out = model(torch.from_numpy(x), torch.from_numpy(t), class_labels=torch.from_numpy(labels).long()).sample
        other = model(torch.from_numpy(x), torch.from_numpy(t), class_labels=torch.tensor([4, 1, 7])).sample
    assert np.abs(out.numpy() - other.numpy()).max() > 1e-3  # the labels matter, so the comparison can fail
    return dict(state_dict=numpy_state_dict(model), x=x, t=t, labels=labels, out=out.numpy())


@pytest.fixture(scope="module")
def converted_class_net(class_reference):
    net = load_diffusers_weights(DDPMUNet(**TINY_KWARGS, num_class_embeds=10), class_reference["state_dict"])
    net.set_train(False)
    return net


def test_class_conditional_matches_diffusers(class_reference, converted_class_net, mode):
    ref = class_reference
    out = converted_class_net(ms.Tensor(ref["x"]), ms.Tensor(ref["t"]), ms.Tensor(ref["labels"])).asnumpy()
    assert_matches(out, ref["out"])


def test_class_conditioning_is_required_or_refused(converted_class_net, random_net):
    x, t = ms.Tensor(np.zeros((1, 3, 8, 8), np.float32)), ms.Tensor(np.array([1], np.int64))
    with pytest.raises(ValueError, match="class-conditional .*pass cond"):
        converted_class_net(x, t)
    with pytest.raises(ValueError, match="unconditional .*takes no class labels"):
        random_net(x, t, ms.Tensor(np.array([1], np.int32)))
    assert converted_class_net.num_class_embeds == 10 and random_net.num_class_embeds is None


def test_legacy_attention_names_convert_identically(reference):
    current = reference["state_dict"]
    legacy = legacy_attention_names(current)
    # One attention block in the encoder, two in the decoder (num_res_blocks + 1), one in the middle.
    assert sum(name.endswith(".proj_attn.weight") for name in legacy) == 4
    converted_current = convert_diffusers_state_dict(current)
    converted_legacy = convert_diffusers_state_dict(legacy)
    assert converted_legacy.keys() == converted_current.keys()
    for name, value in converted_current.items():
        np.testing.assert_array_equal(converted_legacy[name], value)

    net = load_diffusers_weights(DDPMUNet(**TINY_KWARGS), legacy)
    net.set_train(False)
    with execution_mode(ms.PYNATIVE_MODE):
        out = net(ms.Tensor(reference["x"]), ms.Tensor(reference["t"])).asnumpy()
    assert_matches(out, reference["out"])


@pytest.mark.parametrize("weights_format", ["safetensors", "legacy-bin"])
def test_converter_script_end_to_end(reference, tmp_path, weights_format):
    # the legacy names as in google/ddpm-cifar10-32's .bin
    weights, config = save_diffusers_model(reference["model"], tmp_path / "unet", weights_format)
    output = tmp_path / "tiny.ckpt"
    result = run_script("convert_diffusers_unet", "--input", str(weights), "--config", str(config),
                        "--output", str(output), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout

    net = DDPMUNet(**TINY_KWARGS)
    not_loaded, unused = ms.load_param_into_net(net, ms.load_checkpoint(str(output)), strict_load=True)
    assert not_loaded == [] and unused == []
    net.set_train(False)
    with execution_mode(ms.PYNATIVE_MODE):
        out = net(ms.Tensor(reference["x"]), ms.Tensor(reference["t"])).asnumpy()
    assert_matches(out, reference["out"])


def test_converter_maps_paper_config():
    config = {"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", **PAPER_DIFFUSERS_CONFIG}
    kwargs = load_script("convert_diffusers_unet").ddpm_unet_kwargs(json.loads(json.dumps(config)))
    assert kwargs == dict(in_channels=3, out_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                          attn_resolutions=(16,), image_size=32, dropout=0.0, num_groups=32, eps=1e-6)


def test_converter_maps_a_class_conditional_config():
    config = {**PAPER_DIFFUSERS_CONFIG, "num_class_embeds": 11, "class_embed_type": None}
    assert load_script("convert_diffusers_unet").ddpm_unet_kwargs(config)["num_class_embeds"] == 11


@pytest.mark.parametrize("change, message", [
    (dict(flip_sin_to_cos=True), "flip_sin_to_cos"),
    (dict(downsample_padding=1), "downsample_padding"),
    (dict(attention_head_dim=8), "single-head"),
    (dict(up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")), "mirrors"),
    (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D")), "unsupported"),
    (dict(num_class_embeds=10, class_embed_type="timestep"), "class_embed_type"),
])
def test_converter_refuses_unrepresentable_config(change, message):
    converter = load_script("convert_diffusers_unet")
    with pytest.raises(converter.ConversionError, match=message):
        converter.ddpm_unet_kwargs({**PAPER_DIFFUSERS_CONFIG, **change})


def test_image_size_not_divisible():
    with pytest.raises(ValueError, match=r"multiple of .* = 8.*valid sizes are 8, 16, 24.*24 or 32"):
        DDPMUNet(image_size=30)


def test_input_size_not_divisible(random_net, mode):
    x = ms.Tensor(np.zeros((1, 3, 6, 6), np.float32))
    with pytest.raises(ValueError, match="multiples of 4"):
        random_net(x, ms.Tensor(np.array([1], np.int64)))


def test_mismatched_state_dict_names_missing_keys(random_net):
    # DDPMUNet's own names pass through the conversion unchanged, so no torch is needed here.
    state_dict = {p.name: p.asnumpy() for p in random_net.get_parameters()}
    del state_dict["mid_block.attentions.0.to_k.weight"]
    del state_dict["conv_norm_out.gamma"]
    state_dict["mid_block.attentions.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="missing") as info:
        load_diffusers_weights(DDPMUNet(**TINY_KWARGS), state_dict)
    for name in ("mid_block.attentions.0.to_k.weight", "conv_norm_out.gamma", "mid_block.attentions.0.extra.weight"):
        assert name in str(info.value)


def test_mismatched_state_dict_shape(random_net):
    state_dict = {p.name: p.asnumpy() for p in random_net.get_parameters()}
    state_dict["conv_out.weight"] = np.zeros((1, 16, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"conv_out.weight: checkpoint \(1, 16, 3, 3\)"):
        load_diffusers_weights(DDPMUNet(**TINY_KWARGS), state_dict)


def test_converter_missing_file(tmp_path):
    result = run_script("convert_diffusers_unet", "--input", str(tmp_path / "absent.safetensors"),
                        "--output", str(tmp_path / "x.ckpt"), cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "not found" in result.stderr, result.stderr
    assert not (tmp_path / "x.ckpt").exists()


def test_converter_mismatched_keys(random_net, tmp_path):
    weights = tmp_path / "model.safetensors"
    save_file({p.name: p.asnumpy() for p in random_net.get_parameters()}, str(weights))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(TINY_DIFFUSERS_CONFIG, layers_per_block=2)))  # one ResNet block too many
    result = run_script("convert_diffusers_unet", "--input", str(weights), "--config", str(config),
                        "--output", str(tmp_path / "x.ckpt"), cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "missing" in result.stderr and "down_blocks.0.resnets.1.conv1.weight" in result.stderr
