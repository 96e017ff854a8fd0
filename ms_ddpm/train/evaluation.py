"""FD and KID while training (`train.eval_every`; for an autoencoder run, the PSNR of its reconstructions of the
test split: `ReconstructionEvaluation`): the trainer's hook that measures the EMA model every so often,
logs the numbers, keeps the checkpoint of the lowest FD and plots the run.

Every `eval_every` steps (and at the last step), on rank 0:
  * `eval_num` samples are drawn from the EMA weights through the trainer's one sampling network (the network of its
    sample grids, `DenoisingTask.sampling_pipeline`: built and compiled once per run), with `eval_sampler` at
    `eval_steps` steps (DDIM, few steps), in batches of `eval_batch_size`, always from the seed `train.seed`, so
    successive evaluations differ by the weights only;
  * their features are compared with those of the whole test split, computed once per run when the evaluation is
    built: FD (Heusel et al. 2017, Eq. 6) and KID (Binkowski et al. 2018), as `ms-ddpm evaluate` computes them
    (`ms_ddpm.metrics.evaluate`), including the rounding of the samples to the 8-bit grid;
  * the record {"event": "eval", "step", "fd", "kid", "best", ...} goes to train_log.jsonl;
  * a lower FD than any before in this run (resumed runs included: the log says) rewrites `ckpt_best.ckpt`
    (`ms_ddpm.checkpoint.save_best_checkpoint`: atomically, the contents of a regular checkpoint of that step,
    neither counted by `keep_checkpoints` nor taken by --resume);
  * metrics.png is redrawn: loss, learning rate and FD over the steps (`ms_ddpm.visualize.save_training_curves`).

Feature space: `eval_features` (a feature-extractor checkpoint, as `ms-ddpm evaluate --features`); when it is not
given and the data are grayscale IDX images (MNIST, Fashion-MNIST; `data.channels` 1), the MNIST
classifier trained once per data set and cached (`ms_ddpm.metrics.classifier_training.cached_classifier`); for other
data (RGB, folders) raw pixels, announced once as a pixel-space FD, not comparable to FID.

FD at `eval_num` samples is biased upwards by the sample size (more so below a few times the feature dimension,
128 for the MNIST classifier): the numbers compare evaluations of one run, at one `eval_num`; `ms-ddpm evaluate`
with 1,000 or more samples gives the number to report.
"""
import json
import math
import time

import numpy as np

from ..checkpoint import save_best_checkpoint
from ..config import ConfigError
from ..metrics.classifier_training import IDX_DATASETS, cached_classifier
from ..metrics.evaluate import distances, extract_features, feature_space, pixel_note, real_images, to_8bit_grid
from ..metrics.frechet import feature_statistics
from ..metrics.reconstruction import psnr
from ..models import apply_batched
from ..pipeline import build_sampler, default_sampler
from ..utils import check_int
from ..visualize import save_training_curves


def run_records(log_path):
    """The records of train_log.jsonl that belong to the current run, in step order: those after the last fresh
    start (an "event": "start" record at step 0), one per kind and step (a step repeated after resuming from an
    earlier checkpoint keeps its last record)."""
    kept = {}
    if log_path.is_file():
        for line in log_path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("event") == "start" and record["step"] == 0:
                kept = {}
            elif ("loss" in record and "event" not in record) or record.get("event") == "eval":
                kept[(record.get("event"), record["step"])] = record
    return sorted(kept.values(), key=lambda r: r["step"])


def auto_feature_checkpoint(cfg, log=print):
    """The feature checkpoint of a run's evaluations: `train.eval_features`; when None, the cached MNIST classifier
    for grayscale IDX data (trained on first use), else None (raw pixels)."""
    c = cfg.data
    if cfg.train.eval_features is not None:
        return cfg.train.eval_features
    if c.name in IDX_DATASETS and c.channels == 1:
        return cached_classifier(c.name, c.root, log)
    return None


class TrainingEvaluation:
    """The evaluation of one run (see the module docstring): built once on rank 0, called as `evaluation(trainer)`
    at the steps to evaluate.

    Building it checks the settings, gets the feature extractor (training the classifier on first use) and computes
    the test split's features and their statistics.

    Args:
        cfg: the run's Config (train.eval_* settings, the data).
        process: the run's noise process (the sampler is built on it).
        log: called with lines about the feature space (the trainer's print).
    """

    def __init__(self, cfg, process, log=print):
        t = cfg.train
        try:
            check_int("train.eval_every", t.eval_every, 0)
            check_int("train.eval_num", t.eval_num, 2)  # a covariance needs two samples
            check_int("train.eval_batch_size", t.eval_batch_size, 1)
            self.sampler = build_sampler(cfg, process, t.eval_sampler)
            self.sampler.set_timesteps(t.eval_steps)
        except ValueError as err:  # ConfigError included
            raise ConfigError(f"train.eval_*: {err}") from None
        self.cfg = cfg
        self.extractor, self.features = feature_space(auto_feature_checkpoint(cfg, log), cfg)
        if self.extractor is None:
            pixel_note("train.eval_features")
        real = real_images(cfg, None, "test", t.eval_batch_size)
        self.real = extract_features(real, self.extractor, t.eval_batch_size)
        self.real_statistics = feature_statistics(self.real)  # once per run: every evaluation compares with these
        self.best_fd = None  # the lowest FD of the run so far; read from the log at the first evaluation

    def measure(self, pipeline):
        """(FD, KID) of `eval_num` samples of `pipeline` against the test split; NaN for non-finite samples (a
        diverged model), which the trainer's own non-finite check then deals with."""
        t = self.cfg.train
        samples, _ = pipeline(t.eval_num, sampler=self.sampler, seed=t.seed, batch_size=t.eval_batch_size,
                              progress=False)
        if not np.isfinite(samples).all():
            return math.nan, math.nan
        fake = extract_features(to_8bit_grid(samples), self.extractor, t.eval_batch_size)
        return distances(fake, self.real, t.seed, self.real_statistics)

    def __call__(self, trainer):
        """Evaluate the trainer's EMA model at its current step: log, keep the best checkpoint, plot."""
        t = self.cfg.train
        start = time.perf_counter()
        fd, kid = self.measure(trainer.task.sampling_pipeline())
        if self.best_fd is None:
            self.best_fd = min((r["fd"] for r in run_records(trainer.log_path)
                                if r.get("event") == "eval" and math.isfinite(r["fd"])), default=math.inf)
        best = fd < self.best_fd
        if best:
            self.best_fd = fd
            save_best_checkpoint(trainer.output_dir, trainer.step, trainer.state_parameters(), trainer.cfg.to_yaml())
        record = {"event": "eval", "step": trainer.step, "fd": fd, "kid": kid, "best": best,
                  "features": self.features, "num": t.eval_num,
                  "sampler": t.eval_sampler or default_sampler(self.cfg), "steps": t.eval_steps,
                  "seconds": time.perf_counter() - start}
        trainer.log(record)
        save_training_curves(run_records(trainer.log_path), trainer.output_dir / "metrics.png")
        return record


class ReconstructionEvaluation:
    """The evaluation of an autoencoder run (model.name autoencoder_kl): the mean PSNR of the EMA weights'
    reconstructions D(E[z | x]) of the whole test split, logged as {"event": "eval", "step", "psnr"}.

    Args:
        images: the test split, (N, C, H, W) in [-1, 1] (the trainer's `test_images()`).
        batch_size: images per network call (train.eval_batch_size).
    """

    def __init__(self, images, batch_size):
        self.images = images
        self.batch_size = check_int("train.eval_batch_size", batch_size, 1)

    def __call__(self, trainer):
        start = time.perf_counter()
        reconstructions = apply_batched(trainer.task.reconstruction_network(), self.images, self.batch_size)
        record = {"event": "eval", "step": trainer.step, "psnr": psnr(reconstructions, self.images),
                  "num": len(self.images), "seconds": time.perf_counter() - start}
        trainer.log(record)
        return record
