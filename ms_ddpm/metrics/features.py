"""The feature spaces of the Frechet and kernel distances: a small digit classifier for MNIST-like data, and the
checkpoint format shared with the FID Inception-v3.

FID (Heusel et al. 2017) compares Inception-v3 pool3 activations, a network trained on ImageNet photographs. For
digits a common practice swaps Inception for a classifier of the domain and takes its penultimate activations as the
features (the "FID with a domain classifier", or "MNIST-FID", of the MNIST / Fashion-MNIST generative-model
literature). `MNISTClassifier` is such a network:

    input (B, C, H, W) in [-1, 1]  ->  bilinear resize to 28 x 28 when H, W differ
      -> [conv 3x3 -> GroupNorm -> ReLU -> max-pool 2] x 2  ->  conv 3x3 -> GroupNorm -> ReLU      (7 x 7 maps)
      -> flatten -> dense                = the features (times feature_scale), (B, feature_dim)
      -> ReLU -> dense                   = the class logits, (B, num_classes)

Two choices in the feature layer, both for the statistics computed on it:
  * the features are the penultimate layer's pre-activations: after the ReLU many units are zero for every digit
    (76 of 128 on the test digits with the default training run), which makes the feature covariance singular
    and FD's matrix square root ill-conditioned; before it the covariance has full rank;
  * they are multiplied by `feature_scale`, a fixed scalar the training script sets to 1 / RMS of the features of
    the training digits, so the real features have unit mean square per dimension. KID's kernel
    (x . y / d + 1)^3 assumes features of order one (as Inception's pool3 activations are); unscaled (RMS about
    5-8 here), the cubic term dominates and KID's estimate is noise of order 10 (-12.7 measured for 1,000 real
    train vs test digits). FD simply scales by feature_scale^2.

It is trained by `scripts/train_classifier.py`, which writes its weights and its constructor arguments into one
checkpoint, so `load_feature_extractor(path)` rebuilds it from the file alone (as ms_ddpm's trainer stores its
config beside the weights).

Numbers computed in this feature space are "FD / KID with an MNIST classifier": comparable between runs that use the
same classifier checkpoint, not with published FIDs (which are Inception-v3 on 50,000 samples) nor with another
classifier's numbers.

Inception-v3, the real FID, is `ms_ddpm.metrics.inception.FIDInceptionV3`. Its weights are pytorch-fid's, which
users download themselves and convert with scripts/convert_inception_weights.py; the converter writes them with
`save_feature_extractor` too, so `load_feature_extractor` (and `ms-ddpm evaluate --features`) takes either
checkpoint: the entry "feature_extractor" names the class (FEATURE_EXTRACTORS), "architecture" its constructor
arguments. `ms_ddpm.metrics.evaluate` uses only the extractor's `features(x) -> (B, D)`, `input_channels` and `kind`.
"""
import json
from pathlib import Path

import mindspore as ms
from mindspore import nn, ops

from ..models.normalization import GroupNorm
from ..checkpoint import CheckpointError, load_verified, save_atomic
from .inception import FIDInceptionV3

INPUT_SIZE = 28  # MNIST's native resolution; other sizes are resized to it


class MNISTFeatures(nn.Cell):
    """The classifier up to its penultimate layer's pre-activations: images (B, C, H, W) in [-1, 1] ->
    (B, feature_dim)."""

    def __init__(self, channels=1, widths=(16, 32, 64), feature_dim=128, groups=8):
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"widths must list the 3 convolution widths, got {widths!r}")
        c1, c2, c3 = widths

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, pad_mode="same", has_bias=True), GroupNorm(groups, c_out), nn.ReLU()]

        self.channels = channels
        self.convs = nn.SequentialCell(
            block(channels, c1) + [nn.MaxPool2d(2, 2)]  # 28 -> 14
            + block(c1, c2) + [nn.MaxPool2d(2, 2)]  # 14 -> 7
            + block(c2, c3)
        )
        self.flatten = nn.Flatten()
        self.dense = nn.Dense(c3 * (INPUT_SIZE // 4) ** 2, feature_dim)

    def construct(self, x):
        if x.shape[-2] != INPUT_SIZE or x.shape[-1] != INPUT_SIZE:  # static shapes: resolved at compile time
            x = ops.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.dense(self.flatten(self.convs(x)))


class MNISTClassifier(nn.Cell):
    """Digit classifier whose penultimate activations are the features of the Frechet / kernel distances.

    Args:
        channels: input channels (1 for MNIST-like data).
        widths: output channels of the three 3x3 convolutions.
        feature_dim: width of the penultimate (feature) layer.
        num_classes: classes of the linear head.
        groups: GroupNorm groups (must divide every width).

    `construct(x)` gives the logits (B, num_classes); `features(x)` the feature vectors (B, feature_dim): the
    penultimate pre-activations times `feature_scale` (a non-trainable weight, 1 until the training script
    calibrates it). Both take images (B, C, H, W) in [-1, 1]; sizes other than 28 x 28 are resized bilinearly first.
    """

    kind = "mnist_classifier"  # the checkpoint entry that `load_feature_extractor` rebuilds this class from

    def __init__(self, channels=1, widths=(16, 32, 64), feature_dim=128, num_classes=10, groups=8):
        super().__init__()
        self.config = {"channels": int(channels), "widths": [int(w) for w in widths],
                       "feature_dim": int(feature_dim), "num_classes": int(num_classes), "groups": int(groups)}
        self.backbone = MNISTFeatures(channels, tuple(widths), feature_dim, groups)
        self.relu = nn.ReLU()
        self.head = nn.Dense(feature_dim, num_classes)
        self.feature_scale = ms.Parameter(ms.Tensor(1.0, ms.float32), name="feature_scale", requires_grad=False)

    @property
    def feature_dim(self):
        return self.config["feature_dim"]

    @property
    def input_channels(self):
        return (self.config["channels"],)

    def features(self, x):
        """Penultimate pre-activations times feature_scale, (B, feature_dim). The backbone is a Cell of its own, so
        graph mode compiles it."""
        return self.backbone(x) * self.feature_scale

    def construct(self, x):
        return self.head(self.relu(self.backbone(x)))


#: the feature extractors a checkpoint can hold, by the value of its "feature_extractor" entry
FEATURE_EXTRACTORS = {cls.kind: cls for cls in (MNISTClassifier, FIDInceptionV3)}
HOW_TO_MAKE = ("train a classifier with scripts/train_classifier.py or convert Inception weights with "
               "scripts/convert_inception_weights.py")


def save_feature_extractor(net, path, extra=None):
    """Write a feature extractor's weights, class and constructor arguments to `path` atomically (`save_atomic`).

    Args:
        net: an instance of one of FEATURE_EXTRACTORS (MNISTClassifier, FIDInceptionV3).
        path: the checkpoint to write.
        extra: more strings to store (e.g. the test accuracy), read back by `load_feature_extractor`'s caller from
            `net.checkpoint_info`.
    """
    if type(net) not in FEATURE_EXTRACTORS.values():
        raise ValueError(f"net must be one of {[cls.__name__ for cls in FEATURE_EXTRACTORS.values()]}, "
                         f"got {type(net).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"feature_extractor": net.kind, "architecture": json.dumps(net.config)}
    info.update(extra or {})
    return save_atomic(path, net.get_parameters(), info)


def load_feature_extractor(path):
    """Rebuild the feature extractor saved at `path` by `save_feature_extractor` (scripts/train_classifier.py's
    `MNISTClassifier` or scripts/convert_inception_weights.py's `FIDInceptionV3`), in inference mode. Its extra
    checkpoint strings are in `net.checkpoint_info`.

    Raises:
        CheckpointError: the file is missing, corrupt, or not a feature-extractor checkpoint.
    """
    raw = load_verified(path, "feature-extractor checkpoint", HOW_TO_MAKE, f"make it again: {HOW_TO_MAKE}")
    cls = FEATURE_EXTRACTORS.get(str(raw.get("feature_extractor", "")))
    if cls is None or "architecture" not in raw:
        raise CheckpointError(f"{path} is not a feature-extractor checkpoint (it was not written by "
                              "scripts/train_classifier.py nor scripts/convert_inception_weights.py)")
    try:
        net = cls(**json.loads(str(raw["architecture"])))
    except (TypeError, ValueError) as err:
        message = f"feature-extractor checkpoint {path} has an unusable architecture entry: {err}"
        raise CheckpointError(message) from None
    params = {p.name: p for p in net.get_parameters()}
    missing = sorted(set(params) - set(raw))
    if missing:
        raise CheckpointError(f"feature-extractor checkpoint {path} lacks the weights {missing[:5]}")
    bad = [k for k in params if tuple(raw[k].shape) != tuple(params[k].shape)]
    if bad:
        raise CheckpointError(f"feature-extractor checkpoint {path}: weights {bad[:5]} do not match its architecture")
    ms.load_param_into_net(net, {k: ms.Parameter(raw[k].value(), name=k) for k in params}, strict_load=True)
    net.set_train(False)
    net.checkpoint_info = {k: str(v) for k, v in raw.items() if k not in params}
    return net
