"""The Inception-v3 of the Frechet Inception Distance: images -> the 2048-d pool3 features.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium")
compares the Gaussian statistics of the activations of the last pooling layer ("pool3") of the Inception-v3
classifier (Szegedy et al. 2016, "Rethinking the Inception Architecture for Computer Vision"), with the weights of
the TensorFlow graph `inception-2015-12-05` that the authors' code uses. Published FIDs are comparable only when
computed with exactly that network. `FIDInceptionV3` is pytorch-fid's port of it (`InceptionV3` with
`use_fid_inception=True`, whose weights file `scripts/convert_inception_weights.py` converts):

    input (B, 1 or 3, H, W) in [-1, 1]  ->  grayscale repeated to 3 channels  ->  bilinear resize to 299 x 299
      -> Conv2d_1a_3x3 .. Conv2d_4a_3x3 with two 3x3 / 2 max-pools                       (192 x 35 x 35)
      -> Mixed_5b-5d (A), Mixed_6a (B), Mixed_6b-6e (C), Mixed_7a (D), Mixed_7b-7c (E)     (2048 x 8 x 8)
      -> global average pool = pool3, (B, 2048)

It is torchvision's Inception-v3 layout (every convolution a bias-free conv -> BatchNorm(eps 0.001) -> ReLU) with
the TF graph's differences that pytorch-fid patches in: a 1008-way classifier (unused here), average pooling that
ignores the zero padding (TF's "SAME" average pool) in the A, C and first E blocks, and max pooling in the last E
block. Layer names are torchvision's, so a torch state-dict key is a parameter name once BatchNorm's four tensors
are renamed (`TORCH_TO_MINDSPORE`).

The input range [-1, 1] is the one the network was trained on; pytorch-fid maps its [0, 1] inputs to it, ms_ddpm's
images are in it already. The resize is pytorch-fid's `F.interpolate(..., mode="bilinear", align_corners=False)`,
so FIDs match pytorch-fid's on the same images, not clean-fid's (antialiased PIL resize) nor exactly the original
TF code's.
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

INPUT_SIZE = 299  # the resolution the TF graph was trained and published at
FEATURE_DIM = 2048  # channels of Mixed_7c, averaged into pool3

# torch BatchNorm2d tensor -> MindSpore BatchNorm2d parameter; convolution weights keep their names.
TORCH_TO_MINDSPORE = {"bn.weight": "bn.gamma", "bn.bias": "bn.beta", "bn.running_mean": "bn.moving_mean",
                      "bn.running_var": "bn.moving_variance"}
# torchvision's fully connected layer with the TF graph's 1008 outputs on top of pool3; FID does not use it.
CLASSIFIER_SHAPE = {"fc.weight": (1008, FEATURE_DIM), "fc.bias": (1008,)}


def _torch_name(ms_name):
    """The torch state-dict key of a parameter, e.g. "Mixed_5b.branch1x1.bn.moving_variance" ->
    "Mixed_5b.branch1x1.bn.running_var"."""
    for torch_suffix, ms_suffix in TORCH_TO_MINDSPORE.items():
        if ms_name.endswith("." + ms_suffix):
            return ms_name[:-len(ms_suffix)] + torch_suffix
    return ms_name


def _ignored(torch_key):
    """Keys of the weights file that pool3 does not need: BatchNorm's training-step counter and the classifier."""
    return torch_key.endswith(".num_batches_tracked") or torch_key in CLASSIFIER_SHAPE


def load_torch_state_dict(net, state_dict):
    """Copy pytorch-fid's FID Inception weights into `net`.

    Args:
        net: a `FIDInceptionV3`.
        state_dict: torch state-dict key -> array (numpy, float), e.g. of `pt_inception-2015-12-05-6726825d.pth`.

    Raises:
        ValueError: keys are missing or not part of the FID Inception, or a tensor has the wrong shape; the message
            names a few.
    """
    params = {_torch_name(p.name): p for p in net.get_parameters()}
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(k for k in state_dict if k not in params and not _ignored(k))
    if missing or unexpected:
        parts = [f"{len(missing)} weights of the FID Inception are missing (e.g. {missing[:3]})"] if missing else []
        if unexpected:
            parts.append(f"{len(unexpected)} keys are not part of it (e.g. {unexpected[:3]})")
        raise ValueError("; ".join(parts))
    shapes = dict(CLASSIFIER_SHAPE, **{k: tuple(p.shape) for k, p in params.items()})
    bad = [f"{k} {tuple(np.shape(state_dict[k]))} instead of {shapes[k]}" for k in sorted(state_dict)
           if k in shapes and tuple(np.shape(state_dict[k])) != shapes[k]]
    if bad:
        # A 1000-class fc is torchvision's ImageNet Inception: same layer names, other weights, other features.
        raise ValueError(f"{len(bad)} tensors have the wrong shape (e.g. {bad[:3]}); the FID Inception is the TF "
                         "2015-12-05 graph with 1008 classes")
    weights = {p.name: ms.Parameter(ms.Tensor(np.asarray(state_dict[k], np.float32)), name=p.name)
               for k, p in params.items()}
    ms.load_param_into_net(net, weights, strict_load=True)


class BasicConv2d(nn.Cell):
    """Bias-free convolution -> BatchNorm (eps 0.001) -> ReLU, torchvision's `BasicConv2d` that pytorch-fid's port uses.

    Args:
        in_channels, out_channels: channels.
        kernel_size: int or (kh, kw).
        stride: int.
        padding: torch's convention, int or (ph, pw), zeros on both sides.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
                              padding=(ph, ph, pw, pw), has_bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.relu = nn.ReLU()

    def construct(self, x):
        return self.relu(self.bn(self.conv(x)))


def _tf_avg_pool():
    """3x3 / 1 average pool whose border averages exclude the padding, as TF's "SAME" pooling (pytorch-fid's patch:
    `count_include_pad=False`)."""
    return nn.AvgPool2d(3, 1, pad_mode="pad", padding=1, count_include_pad=False)


class InceptionA(nn.Cell):
    """Mixed_5b-5d (Szegedy et al. 2016, Fig. 5): 1x1, 5x5, double 3x3 and pooled branches, concatenated."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.pool = _tf_avg_pool()
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def construct(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return ops.cat((self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(self.pool(x))), axis=1)


class InceptionB(nn.Cell):
    """Mixed_6a: grid reduction 35 -> 17 by strided convolutions beside a max-pool (Szegedy et al. 2016, Fig. 10)."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)
        self.pool = nn.MaxPool2d(3, 2)

    def construct(self, x):
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return ops.cat((self.branch3x3(x), branch3x3dbl, self.pool(x)), axis=1)


class InceptionC(nn.Cell):
    """Mixed_6b-6e: 7x7 convolutions factorised into 1x7 and 7x1 (Szegedy et al. 2016, Fig. 6)."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.pool = _tf_avg_pool()
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def construct(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        return ops.cat((self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(self.pool(x))), axis=1)


class InceptionD(nn.Cell):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)
        self.pool = nn.MaxPool2d(3, 2)

    def construct(self, x):
        branch7x7x3 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(branch7x7x3))
        return ops.cat((self.branch3x3_2(self.branch3x3_1(x)), branch7x7x3, self.pool(x)), axis=1)


class InceptionE(nn.Cell):
    """Mixed_7b-7c: expanded filter banks, 3x3 split into parallel 1x3 and 3x1 (Szegedy et al. 2016, Fig. 7).

    Args:
        in_channels: input channels.
        max_pool: pool the last branch with a max-pool, as the TF graph's Mixed_7c does (pytorch-fid's
            FIDInceptionE_2; most likely a slip in that graph, but the published FIDs are computed with it);
            False: the padding-excluding average pool of the other blocks (FIDInceptionE_1).
    """

    def __init__(self, in_channels, max_pool):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.pool = nn.MaxPool2d(3, 1, pad_mode="pad", padding=1) if max_pool else _tf_avg_pool()
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def construct(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = ops.cat((self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)), axis=1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = ops.cat((self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)), axis=1)
        return ops.cat((self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(self.pool(x))), axis=1)


class FIDInceptionV3(nn.Cell):
    """Inception-v3 up to pool3 with the layout of the FID graph (see the module docstring).

    `construct(x)` and `features(x)` both give the pool3 features (B, 2048) of images (B, C, H, W) in [-1, 1],
    C = 1 (repeated to RGB) or 3, any H and W (resized bilinearly to 299 x 299). The weights are random until
    loaded: `load_torch_state_dict`, or `ms_ddpm.metrics.load_feature_extractor` on the checkpoint that
    scripts/convert_inception_weights.py writes.
    """

    kind = "fid_inception_v3"  # the checkpoint entry that `load_feature_extractor` rebuilds this class from
    input_channels = (1, 3)  # RGB, or grayscale repeated to RGB
    feature_dim = FEATURE_DIM

    def __init__(self):
        super().__init__()
        self.config = {}  # no constructor arguments: there is one FID network
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, 2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.maxpool2 = nn.MaxPool2d(3, 2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def features(self, x):
        """pool3 features (B, 2048); calls the Cell, so graph mode compiles it."""
        return self(x)

    def construct(self, x):
        # Shapes are static: these branches are resolved when graph mode compiles.
        if x.shape[1] == 1:
            x = ops.tile(x, (1, 3, 1, 1))
        elif x.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3 takes images with 1 or 3 channels, got {x.shape[1]}")
        if x.shape[-2] != INPUT_SIZE or x.shape[-1] != INPUT_SIZE:
            x = ops.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return x.mean(axis=(2, 3))
