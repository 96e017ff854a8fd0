"""The training step's device-side draws: Threefry-2x32 against Random123's known answers, the same numbers in
GRAPH_MODE and PYNATIVE_MODE, t uniform, noise standard normal, label dropout at its rate, and draws that depend
on a sample's place in the step's global batch only (ranks and micro-batches split it without changing them)."""
import mindspore as ms
import numpy as np
import pytest

from ms_ddpm.train.randomness import TrainingDraws, threefry2x32


def draws(drawer, step, first, shape, labels=None):
    t, noise, cond = drawer(ms.Tensor(step, ms.int32), ms.Tensor(first, ms.int32), shape,
                            None if labels is None else ms.Tensor(labels))
    return t.asnumpy(), noise.asnumpy(), None if cond is None else cond.asnumpy()


@pytest.mark.parametrize("key,counter,expected", [
    # Random123's kat_vectors for threefry2x32 with 20 rounds (also JAX's threefry tests)
    ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
])
def test_threefry_matches_the_known_answers(key, counter, expected):
    c0, c1 = (ms.Tensor(np.array([c], np.int64)) for c in counter)
    x0, x1 = threefry2x32(key, c0, c1)
    assert (int(x0.asnumpy()[0]), int(x1.asnumpy()[0])) == expected


def test_graph_mode_draws_what_pynative_draws():
    drawer = TrainingDraws(seed=2**40 + 7, num_labels=1000, drop_prob=0.3, null_label=10)
    labels = np.arange(6, dtype=np.int32) % 10
    pynative = draws(drawer, 12, 6, (6, 3, 5, 5), labels)  # an odd C H W: the last normal pair is cut
    ms.set_context(mode=ms.GRAPH_MODE)
    graph = draws(drawer, 12, 6, (6, 3, 5, 5), labels)
    np.testing.assert_array_equal(graph[0], pynative[0])
    np.testing.assert_array_equal(graph[2], pynative[2])
    np.testing.assert_allclose(graph[1], pynative[1], rtol=1e-6, atol=1e-6)
    assert pynative[1].shape == (6, 3, 5, 5) and pynative[1].dtype == np.float32 and pynative[0].dtype == np.int32


def test_t_is_uniform_and_noise_standard_normal():
    """20 micro-batches of 1,000 samples of 64 values: t's histogram over 10 labels passes a chi-square test
    (p = 0.001), the noise's mean, variance, skewness, kurtosis and P(|z| < 1) are N(0, 1)'s within 5 standard
    errors, and neighbouring values are uncorrelated."""
    drawer = TrainingDraws(seed=3, num_labels=10)
    ts, noise = zip(*(draws(drawer, step, 0, (1000, 1, 8, 8))[:2] for step in range(20)))
    t, z = np.concatenate(ts), np.concatenate(noise).astype(np.float64).ravel()
    counts = np.bincount(t, minlength=10)
    assert t.min() >= 0 and t.max() <= 9
    assert ((counts - 2000) ** 2 / 2000).sum() < 27.9, counts  # chi-square, 9 degrees of freedom, p = 0.001
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(np.mean(z**3)) < 5 * np.sqrt(15 / n)
    assert abs(np.mean(z**4) - 3) < 5 * np.sqrt(96 / n)
    assert abs(np.mean(np.abs(z) < 1) - 0.682689) < 5 * np.sqrt(0.683 * 0.317 / n)
    assert abs(np.mean(z[1:] * z[:-1])) < 5 / np.sqrt(n)  # within and across the Box-Muller pairs


def test_label_dropout_rate_matches_cond_drop_prob():
    """The share of labels replaced by the null label over 8 micro-batches of 2,500 is 0.1 within 4 standard errors,
    the other labels pass unchanged, and t and noise are the draws of an unconditional run."""
    labels = np.arange(2500, dtype=np.int32) % 10
    drawer = TrainingDraws(seed=3, num_labels=100, drop_prob=0.1, null_label=10)
    dropped, total = 0, 0
    for step in range(8):
        _, _, cond = draws(drawer, step, 0, (2500, 1, 2, 2), labels)
        kept = cond != 10
        np.testing.assert_array_equal(cond[kept], labels[kept])
        dropped, total = dropped + int((~kept).sum()), total + 2500
    assert abs(dropped / total - 0.1) < 4 * np.sqrt(0.1 * 0.9 / total), dropped / total
    t0, noise0, none = draws(TrainingDraws(seed=3, num_labels=100), 5, 0, (50, 1, 2, 2))
    t1, noise1, _ = draws(drawer, 5, 0, (50, 1, 2, 2), labels[:50])
    assert none is None
    np.testing.assert_array_equal(t0, t1)
    np.testing.assert_array_equal(noise0, noise1)


def test_a_samples_draws_depend_on_its_place_in_the_global_batch_only():
    """Samples 4-7 of a batch of 8 draw what a micro-batch of 4 starting at sample 4 (rank 1 of 2, or the second
    micro-batch) draws; other places, steps and seeds draw otherwise."""
    drawer = TrainingDraws(seed=1, num_labels=1000)
    t8, noise8, _ = draws(drawer, 3, 0, (8, 1, 4, 4))
    t4, noise4, _ = draws(drawer, 3, 4, (4, 1, 4, 4))
    np.testing.assert_array_equal(t4, t8[4:])
    np.testing.assert_array_equal(noise4, noise8[4:])
    for other in (draws(drawer, 3, 0, (4, 1, 4, 4)), draws(drawer, 4, 4, (4, 1, 4, 4)),
                  draws(TrainingDraws(seed=2, num_labels=1000), 3, 4, (4, 1, 4, 4))):
        assert not np.allclose(other[1], noise4)


def test_a_seed_outside_64_bits_is_refused():
    with pytest.raises(ValueError, match=r"train.seed must be an integer in \[0, 2\*\*64\), got -1"):
        TrainingDraws(seed=-1, num_labels=10)
