"""scripts/background_speckle.py: its speckle test passes the real digits and catches a grey, noisy background;
a bad variant is refused with the format. The sampling itself is docs/quality.md's measurement (slow, not here)."""
import numpy as np
import pytest

from tests.helpers import MNIST5K, load_script

speckle = load_script("background_speckle")


def test_no_real_test_digit_is_speckled_and_a_grey_noisy_background_is():
    raw = (MNIST5K / "t10k-images-idx3-ubyte").read_bytes()
    digits = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 1, 28, 28).astype(np.float32) / 127.5 - 1
    assert len(digits) == 1000 and not speckle.speckled(digits).any()
    # the same digits on a background of N(-0.8, 0.15) noise, as the speckled samples look
    noisy = np.where(digits > -1, digits, np.random.default_rng(0).normal(-0.8, 0.15, digits.shape)).clip(-1, 1)
    assert speckle.speckled(noisy.astype(np.float32)).all()


@pytest.mark.parametrize("variant", ["ddim:50:2", "euler:50:2:clip", "ddim:50:2:clamp", "ddim:50:2:clip:1"])
def test_a_bad_variant_is_refused_with_the_format(variant, capsys):
    with pytest.raises(SystemExit) as exit_info:
        speckle.main(["--ckpt", "absent.ckpt", "--variants", variant, "--json", "unused.jsonl"])
    assert exit_info.value.code == 2 and "SAMPLER:STEPS:SCALE:X0[:LATE_SCALE:T]" in capsys.readouterr().err
