"""The FID Inception-v3 (ms_ddpm.metrics.inception) against pytorch-fid's network on the same random weights, through
scripts/convert_inception_weights.py and load_feature_extractor; the converter's one-line errors; graph mode equal
to PyNative mode.

The torch reference is written out below (torchvision's Inception3 layers with pytorch-fid's FID blocks and
forward): torchvision's Linux wheels on PyPI are built against the CUDA torch and do not import beside the CPU
build, which rules out pytorch-fid too; and the tests download nothing. Random weights with random BatchNorm
statistics stand in for the real file, which the tests do not have.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from ms_ddpm.metrics.features import load_feature_extractor, save_feature_extractor
from ms_ddpm.metrics.inception import FIDInceptionV3

CONVERTER = Path(__file__).resolve().parents[1] / "scripts" / "convert_inception_weights.py"
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's file name, as a user would have it


def load_converter():
    spec = importlib.util.spec_from_file_location("convert_inception_weights", CONVERTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def images(seed=0):
    """Two 28x28 grayscale and two 32x32 RGB images in [-1, 1] (both resized to 299 x 299)."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (2, 1, 28, 28)).astype(np.float32),
            rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32))


def torch_fid_inception(torch):
    """pytorch-fid's `InceptionV3(output_blocks=[3], use_fid_inception=True)` without its download: torchvision's
    `inception_v3(num_classes=1008, aux_logits=False)` layers (same names, hence the same state-dict keys) with
    FIDInceptionA / C / E_1 / E_2 swapped in, and pytorch-fid's forward. Takes (B, 3, H, W) in [0, 1]."""
    nn, F = torch.nn, torch.nn.functional

    class BasicConv2d(nn.Module):
        def __init__(self, in_channels, out_channels, **kwargs):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
            self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)), inplace=True)

    def tf_avg_pool(x):  # pytorch-fid's patch of the A, C and E_1 blocks
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class FIDInceptionA(nn.Module):
        def __init__(self, in_channels, pool_features):
            super().__init__()
            self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
            self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
            self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
            self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

        def forward(self, x):
            branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
            branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(tf_avg_pool(x))], 1)

    class InceptionB(nn.Module):
        def __init__(self, in_channels):
            super().__init__()
            self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class FIDInceptionC(nn.Module):
        def __init__(self, in_channels, channels_7x7):
            super().__init__()
            c7 = channels_7x7
            self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
            self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
            self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
            self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

        def forward(self, x):
            branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            branch7x7dbl = x
            for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                         self.branch7x7dbl_5):
                branch7x7dbl = conv(branch7x7dbl)
            return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(tf_avg_pool(x))], 1)

    class InceptionD(nn.Module):
        def __init__(self, in_channels):
            super().__init__()
            self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
            self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
            self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            branch7x7x3 = x
            for conv in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
                branch7x7x3 = conv(branch7x7x3)
            return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), branch7x7x3,
                              F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class FIDInceptionE(nn.Module):
        """FIDInceptionE_1 (pool=tf_avg_pool) and FIDInceptionE_2 (pool=max_pool2d 3/1/1)."""

        def __init__(self, in_channels, pool):
            super().__init__()
            self.pool = pool
            self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
            self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
            self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

        def forward(self, x):
            branch3x3 = self.branch3x3_1(x)
            branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
            branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
            return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(self.pool(x))], 1)

    class FIDInception(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
            self.Mixed_5b = FIDInceptionA(192, pool_features=32)
            self.Mixed_5c = FIDInceptionA(256, pool_features=64)
            self.Mixed_5d = FIDInceptionA(288, pool_features=64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
            self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
            self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
            self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b = FIDInceptionE(1280, tf_avg_pool)
            self.Mixed_7c = FIDInceptionE(2048, lambda x: F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
            self.fc = nn.Linear(2048, 1008)  # in the state dict, unused by pool3

        def forward(self, x):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
            x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), kernel_size=3, stride=2)
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, "Mixed_" + name)(x)
            return F.adaptive_avg_pool2d(x, (1, 1))[:, :, 0, 0]

    return FIDInception()


def randomise_torch(model, torch, seed=0):
    """He-normal convolutions (activations of order one through the 94 layers) and random BatchNorm affine
    parameters and running statistics, so that a gamma / beta or mean / variance mix-up changes the features."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("conv.weight"):
                fan_in = tensor[0].numel()
                tensor.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
            elif name.endswith("bn.running_var") or name.endswith("bn.weight"):
                tensor.uniform_(0.5, 1.5, generator=gen)
            else:  # bn.bias, bn.running_mean, fc
                tensor.uniform_(-0.2, 0.2, generator=gen)
    return model.eval()


@pytest.fixture(scope="module")
def torch_converted(tmp_path_factory):
    """(torch, the torch reference, its .pth, the MindSpore network converted from it and loaded)."""
    torch = pytest.importorskip("torch", reason="torch is a test-only dependency: pip install -e '.[dev]'")
    root = tmp_path_factory.mktemp("inception")
    reference = randomise_torch(torch_fid_inception(torch), torch)
    pth = root / WEIGHTS_NAME
    torch.save(reference.state_dict(), pth)
    load_converter().convert(str(pth), str(root / "inception_fid.ckpt"))
    return torch, reference, pth, load_feature_extractor(root / "inception_fid.ckpt")


def test_converted_weights_give_pytorch_fid_features(torch_converted):
    """pool3 features of 1-channel 28x28 and 3-channel 32x32 images equal pytorch-fid's on the same weights, to
    1e-4 of their largest magnitude (float32 over 94 layers and a 10x upsampling; measured 2e-7 and 4e-7)."""
    torch, reference, _, net = torch_converted
    assert isinstance(net, FIDInceptionV3) and net.feature_dim == 2048 and net.input_channels == (1, 3)
    assert net.checkpoint_info["source"] == WEIGHTS_NAME
    for x in images():
        out = net.features(ms.Tensor(x)).asnumpy()
        rgb = np.repeat(x, 3, axis=1) if x.shape[1] == 1 else x  # pytorch-fid takes RGB only
        with torch.no_grad():
            expected = reference(torch.from_numpy((rgb + 1) / 2)).numpy()  # pytorch-fid's inputs are in [0, 1]
        assert out.shape == expected.shape == (len(x), 2048)
        assert expected.std() > 0.1  # the random weights keep the features of order one
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def run_converter(*args):
    return subprocess.run([sys.executable, str(CONVERTER), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_converter_refuses_a_missing_file_with_status_2(tmp_path):
    proc = run_converter("--input", tmp_path / "missing.pth", "--output", tmp_path / "out.ckpt")
    assert proc.returncode == 2 and proc.stderr.strip() == \
        f"convert_inception_weights: error: input file not found: {tmp_path / 'missing.pth'}"


def test_converter_errors_are_one_line_with_status_2(torch_converted, tmp_path, capsys):
    torch, reference, pth, _ = torch_converted
    out = tmp_path / "out.ckpt"
    main = load_converter().main
    not_torch = tmp_path / "notes.pth"
    not_torch.write_text("not a pickle")
    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], a_list)
    state = reference.state_dict()
    wrong_keys = tmp_path / "wrong_keys.pth"
    torch.save({k: v for k, v in state.items() if k != "Mixed_6b.branch7x7_2.bn.running_var"}
               | {"AuxLogits.fc.weight": torch.zeros(1000, 768)}, wrong_keys)
    imagenet_head = tmp_path / "imagenet_head.pth"  # torchvision's ImageNet classifier, 1000 classes
    torch.save(state | {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}, imagenet_head)
    cases = [
        (not_torch, f"cannot read {not_torch} as a torch state dict"),
        (a_list, f"{a_list} holds a list that is not a state dict of tensors"),
        (wrong_keys, "1 weights of the FID Inception are missing (e.g. ['Mixed_6b.branch7x7_2.bn.running_var']); "
                     "1 keys are not part of it (e.g. ['AuxLogits.fc.weight'])"),
        (imagenet_head, "2 tensors have the wrong shape (e.g. ['fc.bias (1000,) instead of (1008,)', "
                        "'fc.weight (1000, 2048) instead of (1008, 2048)'])"),
    ]
    for path, message in cases:
        assert main(["--input", str(path), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("convert_inception_weights: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
    assert not out.exists()

    assert main(["--input", str(pth), "--output", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()


def test_save_feature_extractor_refuses_other_cells(tmp_path):
    with pytest.raises(ValueError, match=r"net must be one of \['MNISTClassifier', 'FIDInceptionV3'\], got Dense"):
        save_feature_extractor(ms.nn.Dense(2, 2), tmp_path / "dense.ckpt")


def randomise_mindspore(net, seed=0):
    """The MindSpore counterpart of `randomise_torch`, for the tests that need no torch."""
    rng = np.random.default_rng(seed)
    for p in net.get_parameters():
        shape = tuple(p.shape)
        if p.name.endswith("conv.weight"):
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        elif p.name.endswith(("bn.moving_variance", "bn.gamma")):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.uniform(-0.2, 0.2, shape)
        p.set_data(ms.Tensor(value.astype(np.float32)))
    net.set_train(False)
    return net


def test_graph_mode_equals_pynative_mode():
    net = randomise_mindspore(FIDInceptionV3())
    x = ms.Tensor(images()[0])  # 1 channel: the repetition to RGB and the resize both compiled
    pynative = net.features(x).asnumpy()
    ms.set_context(mode=ms.GRAPH_MODE)
    graph = net.features(x).asnumpy()
    assert pynative.std() > 0.1
    np.testing.assert_allclose(graph, pynative, rtol=0, atol=1e-5 * np.abs(pynative).max())
    with pytest.raises(ValueError, match="1 or 3 channels, got 2"):
        net(ms.Tensor(np.zeros((1, 2, 8, 8), np.float32)))
