"""The training loop: config -> data -> model -> diffusion loss -> compiled step -> EMA -> logs, grids, checkpoints.

The noise process (`diffusion.process`, `ms_ddpm.processes.PROCESSES`: ddpm, ncsn, edm, flow) gives the loss its
target (`DiffusionLoss` reads the process's `training_terms`) and the step its time draw: integer labels uniform
for the discrete processes, the process's `training_time` for the continuous ones.

First stage (`model.name: autoencoder_kl`): the trainer trains the latent-diffusion autoencoder instead of a
denoising network, with `AutoencoderLoss` (reconstruction + `autoencoder.kl_weight` x KL; the eps of its posterior
sample drawn in the step like a diffusion's noise, so resume stays exact), the same compiled step, EMA and
checkpoints; its grids are reconstructions of test images, and with `train.eval_every` the test split's PSNR is
logged (`evaluation.ReconstructionEvaluation`).

Latent diffusion (`latent.autoencoder`): the trainer loads the autoencoder, encodes the training split once into a
latent cache (`ms_ddpm.latent`; the posterior means), resolves `latent.scaling_factor: auto` to 1 / std of those
latents (for a converted VAE: its own factor) and stores it and the autoencoder's arguments in the run's config; the
denoising network trains on batches of the cache and the autoencoder's weights go into every checkpoint, so sampling
decodes from the checkpoint alone.

Class conditioning: a class-conditional model (`model.kwargs.num_classes` for the U-Net) trains on the data's labels,
whose class names go into the run's config (`data.class_names`) and so into every checkpoint; with
`diffusion.cond_drop_prob` > 0 a label is replaced by the null label with that probability (classifier-free guidance,
Ho & Salimans 2021, Algorithm 1), so the same network learns the unconditional model too.

Reproducibility: weights come from `ms.set_seed(seed)`; the timesteps (NCSN: level indices), noise and dropped
labels of optimizer step s are drawn on the device, inside the compiled step, by a counter-based generator keyed by
the seed at counter (s, the sample's place in the step's global batch) (`randomness.TrainingDraws`); the data order
of epoch e from the dataset seed `seed + e`. The random state is thus a function of (seed, rank, step), all in the
checkpoint, and a resumed run continues exactly as the uninterrupted run would (tested) on every rank, except for
dropout masks and random flips, whose MindSpore-side generator state is not exposed.

The loop reads nothing back from the device between its logging steps (the loss, gradient norm, loss scale and
the count of non-finite steps are read at logging steps); the EMA update runs inside the compiled step. So
`train.max_nonfinite_steps` is checked at logging steps: training stops at the first logging step at which the
latest run of non-finite steps is at least that long.

Preemption: SIGTERM (how clusters preempt a job) or SIGINT (Ctrl-C) during `train()` finishes the current optimizer
step, writes a checkpoint of it and raises `Preempted`; `--resume` then continues exactly. In a distributed job the
ranks agree on the step to stop at (`StopSignals.agreed`), rank 0 writes the checkpoint, and every rank stops there.
"""
import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import amp, nn, ops
from mindspore.train.amp import AMP_WHITE_LIST
from tqdm.auto import tqdm

from ..checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, save_checkpoint
from ..config import AutoencoderConfig, Config, ConfigError, DiffusionConfig
from ..data import create_dataset, iterate
from ..guidance import trained_null_label
from ..latent import FirstStage, diffusion_shape, encode_split, load_autoencoder, resolve_scaling_factor
from ..losses import AutoencoderLoss, DiffusionLoss
from ..metrics.evaluate import real_images
from ..models import AutoencoderKL, apply_batched, create_model, recompute_blocks
from ..pipeline import DiffusionPipeline, build_sampler, check_class_rows, check_image_size
from ..processes import create_process
from ..runtime import set_runtime
from ..utils import check_choice
from ..visualize import save_image_grid
from .adam import adam
from .distributed import download_once
from .ema import EMA
from .evaluation import ReconstructionEvaluation, TrainingEvaluation
from .lr_schedule import warmup_cosine_lr
from .randomness import TrainingDraws, counters_per_sample
from .step import DataParallelReduce, TrainStep

# train.* keys that may change between a run and its resumption; everything else must match. (A new train.steps
# stretches the cosine schedule from the resumed step on; train.recompute changes memory and time, not the numbers;
# the samplers of grids and evaluations change what is looked at, not what is trained.)
RESUMABLE_KEYS = {"steps", "log_every", "sample_every", "save_every", "keep_checkpoints", "num_samples",
                  "max_nonfinite_steps", "output_dir", "eval_every", "recompute", "sampler", "eval_sampler"}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a loss that stays non-finite); the message says what to change."""


class Preempted(RuntimeError):
    """Training stopped on a signal after step `step`, whose checkpoint (written by rank 0) is `checkpoint`."""

    def __init__(self, signum, step, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}")


class SumOverRanks:
    """x -> the sum of x over all ranks, compiled: MindSpore 2.8's op-by-op `comm_func.all_reduce` has no CPU kernel
    ("Create kernelmod for op InnerCommAllReduce failed")."""

    def __init__(self):
        self.all_reduce = ops.AllReduce()
        self._sum = ms.jit(self._sum_impl)

    def _sum_impl(self, x):
        return self.all_reduce(x)

    def __call__(self, x):
        return self._sum(x)


class StopSignals:
    """While active (a context manager), SIGTERM and SIGINT only record that a stop was asked for, so the loop can
    finish its step and write a checkpoint; a second signal gets the previous behaviour back (stop at once).

    Outside the main thread Python cannot handle signals, and nothing is changed.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)  # the order of the flags in `agreed`

    def __init__(self, group_size=1):
        self.group_size = group_size
        self.received = None
        self.previous = {}
        self.sum_over_ranks = SumOverRanks() if group_size > 1 else None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        # no print here: a handler that writes while the interrupted code writes the same stream raises
        self.received = signum
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self):
        """The signal to stop on now, or None: on one device the one received; with several ranks, which each
        receive a signal at another moment, one all-reduce of a flag per signal (SIGTERM first), so every rank
        stops after the same step and all exit with the same status."""
        if self.group_size == 1:
            return self.received
        # float32 sums: the only reduction and dtypes (with float16) of MindSpore's CPU AllReduce
        flags = np.array([self.received == s for s in self.SIGNALS], np.float32)
        total = self.sum_over_ranks(ms.Tensor(flags)).asnumpy()
        return next((s for s, n in zip(self.SIGNALS, total) if n > 0), None)

    def synchronize(self):
        """Return on every rank once all have called it: the ranks other than 0 wait here while rank 0 writes the
        checkpoint, so a launcher that stops the job when one rank exits cannot stop rank 0 mid-write."""
        if self.group_size > 1:
            self.sum_over_ranks(ms.Tensor(np.zeros(len(self.SIGNALS), np.float32))).asnumpy()


def mixed_precision(model, amp_level, dtype):
    """`model` at mixed-precision `amp_level` in `dtype`, with every GroupNorm kept in float32 (as mindone keeps
    nn.GroupNorm among its float32 cells; Ascend's aclnnGroupNorm wants input and weights of one dtype). The
    softmaxes cast to float32 themselves (`ms_ddpm.models.softmax`), which holds in graph mode; a float32 Softmax
    cell would hand its float16 input a float32 gradient (its own bprop skips the boundary's cast).

    The returned network is the one to train: `amp.auto_mixed_precision` wraps the network at O2 and O3. O1 is
    MindSpore's white list applied per Cell (its convolutions and dense layers in `dtype`), as MindSpore did before
    2.x: MindSpore 2.8's O1 rewrites the network's source with mindspore.rewrite, which fails on this U-Net
    ("NameError: name 'Conv2dOpt' is not defined").
    """
    if amp_level == "O1":
        white_list = tuple(c for c in AMP_WHITE_LIST if isinstance(c, type) and issubclass(c, nn.Cell))
        for _, cell in model.cells_and_names():
            if isinstance(cell, white_list):
                cell.to_float(dtype)
    else:
        model = amp.auto_mixed_precision(model, amp_level, dtype)
    for _, cell in model.cells_and_names():
        if isinstance(cell, nn.GroupNorm):
            cell.to_float(ms.float32)
    return model


def build_loss_scaler(t):
    check_choice("train.loss_scaler", t.loss_scaler, ("dynamic", "static", "none"))
    if t.loss_scaler == "dynamic":
        return amp.DynamicLossScaler(t.loss_scale, 2, t.loss_scale_window)
    return amp.StaticLossScaler(t.loss_scale if t.loss_scaler == "static" else 1.0)


def build_optimizer(t, params, lr_values):
    check_choice("train.optimizer", t.optimizer, ("adam", "adamw"))
    lr = ms.Tensor(lr_values)
    if t.optimizer == "adam":
        return adam(params, lr)
    return nn.AdamWeightDecay(params, learning_rate=lr, weight_decay=t.weight_decay, eps=1e-8)


def check_resumable(saved_yaml, cfg):
    """Refuse to resume a run whose config differs from the checkpoint's in anything but RESUMABLE_KEYS."""
    saved = Config.from_stored(saved_yaml).to_dict()
    current = cfg.to_dict()
    diffs = [f"{s}.{k}: checkpoint {saved[s][k]!r} vs now {current[s][k]!r}"
             for s in current for k in current[s]
             if current[s][k] != saved[s][k] and not (s == "train" and k in RESUMABLE_KEYS)]
    if diffs:
        raise ConfigError("cannot resume: the config differs from the checkpoint's in " + "; ".join(diffs)
                          + ". Use the checkpoint's config (config.yaml in the run folder) or a new output_dir.")


class Trainer:
    """Builds a run from a Config and trains it; `train()` returns the final loss.

    Distributed data parallelism: pass `rank` and `group_size` (the trainer then shards the data and averages
    gradients across ranks); only rank 0 writes files.
    """

    def __init__(self, cfg, rank=0, group_size=1):
        self.cfg = cfg
        self.rank, self.group_size = rank, group_size
        t = cfg.train
        set_runtime(t)
        if t.steps < 1 or t.batch_size < 1 or t.grad_accumulation < 1:
            raise ConfigError("train.steps, train.batch_size and train.grad_accumulation must be >= 1")
        self.output_dir = Path(t.output_dir)
        ms.set_seed(t.seed)
        self.model = create_model(cfg.model.name, **cfg.model.kwargs)
        #: whether this run trains the latent-diffusion autoencoder (not a denoising network)
        self.first_stage_run = isinstance(self.model, AutoencoderKL)
        self._check_sections()
        self.conditional = self.model.num_class_embeds is not None
        if self.conditional:
            self._take_class_names()
        check_class_rows(self.model, cfg)
        #: the latent run's decoder and its cache of training latents (None in pixel space)
        self.first_stage, self.latents = self._encode_latents() if cfg.latent.autoencoder else (None, None)
        self.process = create_process(cfg.diffusion, latent=self.first_stage is not None)
        check_image_size(self.model, cfg)
        self.null_label = trained_null_label(self.model, cfg)  # None without label dropout
        if t.recompute:
            recompute_blocks(self.model)
        if t.amp_level != "O0":
            self.model = mixed_precision(self.model, t.amp_level, getattr(ms, t.amp_dtype))
        d = cfg.diffusion
        if self.first_stage_run:
            self.loss_fn = AutoencoderLoss(self.model, cfg.autoencoder.loss_type, cfg.autoencoder.kl_weight)
            time = dict(num_labels=1)  # no timesteps: the step's t is drawn and unused
        else:
            # the loss settings are process ddpm's (DDPMConfig.loss_options); the other processes have none
            self.loss_fn = DiffusionLoss(self.model, self.process, **getattr(d.settings, "loss_options", dict)())
            # integer labels uniform (Algorithm 1 of Ho et al.; NCSN's level indices), else the process's own draw
            discrete = self.process.num_timesteps is not None
            time = dict(num_labels=self.process.num_timesteps if discrete else None,
                        training_time=None if discrete else self.process.training_time)
        # built now, so a sampler that does not fit the process or a bad step count fails before training
        self.grid_sampler = None if self.first_stage_run else self._grid_sampler()
        self.grid_pipeline = None  # the sampling network, built at the first grid and reused for every later one
        self.eval_network = None  # the autoencoder's copy for reconstructions (EMA weights), built at first use
        self.lr_values = warmup_cosine_lr(t.lr, t.steps, t.warmup_steps, t.min_lr, t.lr_schedule)
        self.optimizer = build_optimizer(t, self.model.trainable_params(), self.lr_values)
        reduce = DataParallelReduce(self.optimizer.parameters, group_size) if group_size > 1 else None
        if group_size > 1 and cfg.data.download:  # before the ranks' pipelines, which would each download
            download_once(cfg.data.name, cfg.data.root, rank)
        self.ema = EMA(self.model, t.ema_decay, t.ema_warmup) if t.ema_decay > 0 else None
        global_batch = t.batch_size * t.grad_accumulation * group_size
        shape = (t.batch_size,) + diffusion_shape(cfg)
        if self.first_stage_run:  # the noise is the eps of the posterior sample
            shape = self.model.latent_shape(shape)
        if global_batch * counters_per_sample(shape) > 2**32:
            raise ConfigError(f"a global batch of {global_batch} images of {shape[1:]} needs more than 2^32 random "
                              "counters per step: lower train.batch_size or train.grad_accumulation")
        try:
            draws = TrainingDraws(t.seed, drop_prob=d.cond_drop_prob if self.conditional else 0.0,
                                  null_label=self.null_label, **time)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.step_fn = TrainStep(self.loss_fn, self.optimizer, build_loss_scaler(t), draws, t.grad_clip,
                                 t.grad_accumulation, reduce, rank, self.ema, t.ema_every, jit=t.mode == "graph")
        self.step = 0
        self.log_path = self.output_dir / "train_log.jsonl"
        # FD / KID (the autoencoder: PSNR) every eval_every steps, on rank 0 (the test split read here, once)
        self._test_split = None  # the autoencoder run's test images, read at first use
        self.evaluation = None
        if t.eval_every and rank == 0:
            self.evaluation = (ReconstructionEvaluation(self.test_images(), t.eval_batch_size) if self.first_stage_run
                               else TrainingEvaluation(cfg, self.process))

    def _grid_sampler(self):
        t = self.cfg.train
        try:
            sampler = build_sampler(self.cfg, self.process, t.sampler)
            sampler.set_timesteps(t.sample_steps)
        except ValueError as err:  # ConfigError included
            raise ConfigError(f"train.sampler={t.sampler!r}, train.sample_steps={t.sample_steps!r}: {err}") from None
        return sampler

    def _check_sections(self):
        """Refuse settings that would do nothing: an autoencoder run's diffusion or latent settings, a denoising
        run's autoencoder settings, and a latent run's random flips (flipped latents are not the latents of
        flipped images)."""
        cfg = self.cfg
        if self.first_stage_run:
            default = DiffusionConfig().to_dict()
            unused = [f"diffusion.{k}" for k, v in cfg.diffusion.to_dict().items() if default.get(k) != v]
            unused += ["latent.autoencoder"] if cfg.latent.autoencoder else []
            if unused:
                raise ConfigError(f"{', '.join(unused)}: model.name autoencoder_kl trains the autoencoder, not a "
                                  "diffusion; drop them")
        elif cfg.autoencoder != AutoencoderConfig():
            raise ConfigError("the autoencoder section sets the loss of model.name autoencoder_kl runs; drop it for "
                              f"model.name {cfg.model.name!r} (latent diffusion takes a trained one: latent.autoencoder)")
        lat = cfg.latent
        if lat.autoencoder is None and (lat.autoencoder_kwargs is not None or lat.scaling_factor != "auto"):
            raise ConfigError("latent.scaling_factor and latent.autoencoder_kwargs belong to a latent run: set "
                              "latent.autoencoder (the autoencoder's checkpoint) or drop them")
        if cfg.latent.autoencoder and cfg.data.random_flip:
            raise ConfigError("data.random_flip with latent.autoencoder: the latent cache is encoded once, unflipped; "
                              "set data.random_flip: false")

    def _encode_latents(self):
        """Load latent.autoencoder, check it fits the data and the network, encode the training split once, resolve
        scaling_factor (`resolve_scaling_factor`: auto is a converted VAE's own factor, else 1 / std); fills
        latent.autoencoder_kwargs and latent.scaling_factor in the config. Returns (FirstStage, LatentCache)."""
        cfg, lat = self.cfg, self.cfg.latent
        autoencoder, kwargs = load_autoencoder(lat.autoencoder)
        if lat.autoencoder_kwargs is not None and lat.autoencoder_kwargs != kwargs:
            raise ConfigError(f"latent.autoencoder_kwargs {lat.autoencoder_kwargs} differ from those of "
                              f"{lat.autoencoder}, {kwargs}: drop latent.autoencoder_kwargs (the trainer fills it in)")
        if kwargs.get("in_channels", 3) != cfg.data.channels:
            raise ConfigError(f"latent.autoencoder {lat.autoencoder} takes {kwargs.get('in_channels', 3)}-channel "
                              f"images, data.channels is {cfg.data.channels}")
        try:
            autoencoder.check_image_size(cfg.data.image_size, cfg.data.image_size)
        except ValueError as err:
            raise ConfigError(f"data.image_size={cfg.data.image_size}: {err}") from None
        network_channels = getattr(self.model, "channels", None)
        if network_channels != autoencoder.latent_channels:
            raise ConfigError(f"latent.autoencoder {lat.autoencoder} has {autoencoder.latent_channels} latent "
                              f"channels, the network takes {network_channels}: set model.kwargs.channels: "
                              f"{autoencoder.latent_channels}")
        lat.autoencoder_kwargs = kwargs
        cache = encode_split(autoencoder, cfg.data, "train", labels=self.conditional)
        lat.scaling_factor = resolve_scaling_factor(lat.scaling_factor, autoencoder, lambda: cache.latents)
        if self.rank == 0:
            print(f"latent cache: {cache.latents.shape[0]} latents of {cache.latents.shape[1:]}, std "
                  f"{cache.latents.std():.4f} (posterior std {cache.posterior_std:.4f}), scaling_factor "
                  f"{lat.scaling_factor:.6g}", flush=True)
        return FirstStage(autoencoder, lat.scaling_factor), cache

    def _take_class_names(self):
        """Put the data's class names (label order) into the config, which the checkpoints store; a config that
        names other classes is refused."""
        from ..data import class_names  # the data package's labels interface

        c = self.cfg.data
        try:
            names = [str(name) for name in class_names(c.name, c.root)]
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
        if len(names) < 2:
            raise ConfigError(f"a class-conditional model needs a data set with at least 2 classes; {c.name} at "
                              f"{c.root} has {len(names)} {names}: put each class's images in a sub-folder of its own")
        if c.class_names is not None and list(c.class_names) != names:
            raise ConfigError(f"data.class_names {c.class_names} differ from the classes of the data, {names}: "
                              "drop data.class_names (the trainer fills it in)")
        c.class_names = names

    # --- state -------------------------------------------------------------------------------------------------
    def state_parameters(self):
        params = list(self.model.get_parameters()) + self.step_fn.state_parameters()
        if self.ema is not None:
            params += list(self.ema.ema_weights) + [self.ema.num_updates]
        if self.first_stage is not None:  # "autoencoder.*": sampling decodes from the checkpoint alone
            params += list(self.first_stage.get_parameters())
        return params

    def save(self):
        return save_checkpoint(self.output_dir, self.step, self.state_parameters(), self.cfg.to_yaml(),
                               self.cfg.train.keep_checkpoints)

    def resume(self):
        """Restore the newest checkpoint in output_dir, if any; returns its path or None."""
        checkpoints = list_checkpoints(self.output_dir)
        if not checkpoints:
            return None
        state = load_checkpoint(checkpoints[-1])
        check_resumable(state["config"], self.cfg)
        params = self.state_parameters()
        missing = [p.name for p in params if p.name not in state]
        if missing:
            raise ConfigError(f"checkpoint {checkpoints[-1]} lacks {missing[:5]}...: it is from a different setup")
        for p in params:
            p.set_data(state[p.name].value().astype(p.dtype))
        self.step = state["step"]
        return checkpoints[-1]

    # --- loop ----------------------------------------------------------------------------------------------------
    def batches(self):
        """Endless stream of (images, labels) batches (NumPy; labels None for an unconditional model) from
        self.step on; epoch e is shuffled with seed + e."""
        c, t = self.cfg.data, self.cfg.train
        shards = dict(num_shards=self.group_size, shard_id=self.rank) if self.group_size > 1 else {}
        # the labels column only where the model takes it: unconditional runs read the data as before
        labels = dict(labels=True) if self.conditional else {}

        def epoch_pipeline(epoch):
            if self.latents is not None:  # the cache: no encoder runs here
                return self.latents.dataset(t.batch_size, self.cfg.latent.scaling_factor, seed=t.seed + epoch,
                                            **shards)
            return create_dataset(c.name, c.root, "train", c.image_size, c.channels, t.batch_size, shuffle=True,
                                  random_flip=c.random_flip, download=c.download, seed=t.seed + epoch,
                                  num_parallel_workers=c.num_parallel_workers, **shards, **labels)

        ds = epoch_pipeline(0)
        # where self.step left off: this epoch, after `skip` batches
        epoch, skip = divmod(self.step * t.grad_accumulation, ds.get_dataset_size())
        if epoch:
            ds = epoch_pipeline(epoch)
        ds = ds.skip(skip) if skip else ds
        while True:
            for batch in iterate(ds):
                yield batch if self.conditional else (batch[0], None)
            epoch += 1
            ds = epoch_pipeline(epoch)

    def log(self, record):
        if self.rank == 0:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def weights_digest(self):
        """SHA-256 of the model weights: equal on every data-parallel rank when they are in sync."""
        h = hashlib.sha256()
        for p in self.model.trainable_params():
            h.update(p.asnumpy().tobytes())
        return h.hexdigest()[:16]

    def sampling_pipeline(self):
        """The run's sampling pipeline with the EMA weights (or the raw weights without EMA) copied in.

        Its network is built once, at the first call, and reused by every sample grid and evaluation: graph mode
        compiles its sampling step once per run, not once per grid (which kept the other ranks waiting in their
        all-reduce for every compile).
        """
        if self.grid_pipeline is None:
            self.grid_pipeline = DiffusionPipeline(create_model(self.cfg.model.name, **self.cfg.model.kwargs),
                                                   self.process, self.cfg, self.first_stage)
        self.copy_weights_to(self.grid_pipeline.network)
        return self.grid_pipeline

    def copy_weights_to(self, net):
        """Copy the EMA weights (or the raw weights without EMA) into `net`, a network built like the model."""
        if self.ema is not None:
            self.ema.copy_to(net)
        else:
            for src, dst in zip(self.model.trainable_params(), net.trainable_params()):
                dst.set_data(src.value().copy())

    def test_images(self):
        """The test split (N, C, H, W) in [-1, 1], read once: the autoencoder run's grids and PSNR."""
        if self._test_split is None:
            self._test_split = real_images(self.cfg, None, "test", self.cfg.train.eval_batch_size)
        return self._test_split

    def reconstruction_network(self):
        """The autoencoder run's copy of the autoencoder (built once, inference mode) with the EMA weights."""
        if self.eval_network is None:
            self.eval_network = create_model(self.cfg.model.name, **self.cfg.model.kwargs)
            self.eval_network.set_train(False)
        self.copy_weights_to(self.eval_network)
        return self.eval_network

    def sample_grid(self, path):
        """A grid of samples from the EMA weights (or the raw weights without EMA), one row per class for a
        class-conditional model (plain conditional sampling, guidance scale 1); for the autoencoder, rows of test
        images alternating with their reconstructions."""
        t = self.cfg.train
        if self.first_stage_run:
            images = self.test_images()[:t.num_samples]
            reconstructions = apply_batched(self.reconstruction_network(), images, t.eval_batch_size)
            rows = [row for s in range(0, len(images), 8) for row in (images[s:s + 8], reconstructions[s:s + 8])]
            save_image_grid(np.concatenate(rows), path, nrow=min(8, len(images)))
            return
        samples, labels = self.sampling_pipeline()(t.num_samples, sampler=self.grid_sampler, seed=t.seed,
                                                   batch_size=t.num_samples, progress=False)
        save_image_grid(samples, path, labels=labels)

    def _loop(self, until, global_batch, bar, stop):
        """Optimizer steps from self.step to `until`; returns the last loss. `stop`: the run's `StopSignals`.

        Between logging steps nothing is read back from the device: the step draws its own t and noise, updates
        the EMA and counts non-finite steps itself."""
        t = self.cfg.train
        last_time, last_step = time.perf_counter(), self.step
        data = self.batches()
        self.step_fn.start_at(self.step)
        loss_t = None
        while self.step < until:
            for micro in range(t.grad_accumulation):
                images, labels = next(data)
                loss_t, _, norm = self.step_fn(ms.Tensor(images), None if labels is None else ms.Tensor(labels),
                                               micro == t.grad_accumulation - 1)
            self.step += 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.steps:
                loss = float(loss_t.asnumpy())
                nonfinite = int(self.step_fn.nonfinite_steps.asnumpy())
                if nonfinite >= t.max_nonfinite_steps:
                    raise TrainingError(
                        f"loss or gradients were non-finite for {nonfinite} steps in a row (step {self.step}, loss "
                        f"{loss}); lower train.lr, set train.amp_level=O0, or check the data")
                scale = float(self.step_fn.loss_scaler.scale_value.asnumpy())
                now = time.perf_counter()
                img_s = (self.step - last_step) * global_batch / (now - last_time)
                last_time, last_step = now, self.step
                lr = float(self.lr_values[self.step - 1])
                self.log({"step": self.step, "loss": loss, "lr": lr, "loss_scale": scale,
                          "grad_norm": float(norm.asnumpy()), "img_per_s": img_s})
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_s:.1f}", scale=f"{scale:g}")
            signum = stop.agreed() if self.step < until else None  # a signal during the last step changes nothing
            if signum and self.rank == 0:
                print(f"\n{signal.Signals(signum).name}: writing a checkpoint of step {self.step}, then stopping "
                      "(send the signal again to stop at once)", file=sys.stderr, flush=True)
            if self.rank == 0 and (signum or t.save_every and (self.step % t.save_every == 0 or self.step == until)):
                self.save()
            if signum:
                stop.synchronize()
                raise Preempted(signum, self.step, checkpoint_path(self.output_dir, self.step))
            if self.rank == 0 and t.sample_every and (self.step % t.sample_every == 0 or self.step == until):
                self.sample_grid(self.output_dir / f"samples_{self.step:08d}.png")
            if self.evaluation is not None and (self.step % t.eval_every == 0 or self.step == t.steps):
                self.evaluation(self)
        return float("nan") if loss_t is None else float(loss_t.asnumpy())

    def train(self, until=None):
        """Train to `train.steps` (or only to step `until`; the run can be continued later) and return the last loss."""
        t = self.cfg.train
        until = t.steps if until is None else min(until, t.steps)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(self.cfg.to_yaml(), encoding="utf-8")
        global_batch = t.batch_size * t.grad_accumulation * self.group_size
        self.log({"event": "start", "step": self.step, "global_batch_size": global_batch, "lr": t.lr,
                  "devices": self.group_size})
        if self.group_size > 1:
            print(f"rank {self.rank} of {self.group_size}: pid {os.getpid()}, starting at step {self.step}", flush=True)
        if self.rank == 0:
            print(f"rank 0 of {self.group_size}: global batch {global_batch} = {t.batch_size} per device x "
                  f"{self.group_size} devices x {t.grad_accumulation} accumulation; peak lr {t.lr:g}", flush=True)
        self.model.set_train(True)
        bar = tqdm(total=t.steps, initial=self.step, desc="train", disable=self.rank != 0, dynamic_ncols=True)
        try:
            with StopSignals(self.group_size) as stop:
                loss = self._loop(until, global_batch, bar, stop)
        finally:
            bar.close()
        if self.group_size > 1:
            print(f"rank {self.rank}: finished step {self.step}, weights digest {self.weights_digest()}", flush=True)
        return loss
