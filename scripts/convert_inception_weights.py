"""Convert pytorch-fid's FID Inception-v3 weights into a feature-extractor checkpoint for `ms-ddpm evaluate`.

Usage:
    python scripts/convert_inception_weights.py --input pt_inception-2015-12-05-6726825d.pth \\
        --output inception_fid.ckpt
    ms-ddpm evaluate --ckpt outputs/run/ckpt_00010000.ckpt --features inception_fid.ckpt

`--input` is the PyTorch state dict that pytorch-fid (Seitzer, github.com/mseitzer/pytorch-fid) ported from the
TensorFlow graph `inception-2015-12-05` of the FID paper; ms_ddpm downloads nothing, get the file once with e.g.

    wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

Reading a .pth needs torch (pip install torch); the checkpoint written, and everything that uses it, does not.
The output is written by `ms_ddpm.metrics.features.save_feature_extractor`, so `load_feature_extractor` rebuilds
`ms_ddpm.metrics.inception.FIDInceptionV3` from it. Errors (missing file, not a state dict, keys or shapes that are
not the FID Inception's) are printed as one line, exit status 2.
"""
import argparse
import os
import sys

from ms_ddpm.models.state_dict import StateDictError, read_state_dict

PROG = "convert_inception_weights"


class ConversionError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def convert(input_path, output_path):
    """Read pytorch-fid's weights from `input_path`, write the MindSpore feature-extractor checkpoint to
    `output_path`; returns the `FIDInceptionV3` carrying them. Raises ConversionError."""
    output_dir = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(output_dir):
        raise ConversionError(f"output directory does not exist: {output_dir}")
    state_dict = read_state_dict(input_path)

    # Imported only now so that argument and file errors come back without MindSpore's start-up time.
    from ms_ddpm.metrics.features import save_feature_extractor
    from ms_ddpm.metrics.inception import FIDInceptionV3, load_torch_state_dict

    net = FIDInceptionV3()
    try:
        load_torch_state_dict(net, state_dict)
    except ValueError as e:
        raise ConversionError(f"{input_path} is not pytorch-fid's FID Inception: {e}") from None
    try:
        save_feature_extractor(net, output_path, {"source": os.path.basename(input_path)})
    except OSError as e:
        raise ConversionError(f"cannot write {output_path}: {e}") from None
    return net


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="pt_inception-2015-12-05-6726825d.pth of pytorch-fid")
    parser.add_argument("--output", required=True, help="MindSpore checkpoint to write (.ckpt)")
    args = parser.parse_args(argv)
    try:
        net = convert(args.input, args.output)
    except (ConversionError, StateDictError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2  # argparse's status for bad arguments: the input is one
    n_params = sum(p.size for p in net.get_parameters())
    print(f"wrote {args.output}: FIDInceptionV3, {n_params:,} values (pool3 features, {net.feature_dim}-d)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
