"""The training loop: config -> data -> model -> diffusion loss -> compiled step -> EMA -> logs, grids, checkpoints.

What the run trains comes from its task (`tasks.create_task`): `DenoisingTask` (a denoising network on the run's
noise process, `diffusion.process`, in pixel space or, with `latent.autoencoder`, on a latent cache) or
`AutoencoderTask` (`model.name: autoencoder_kl`, the latent-diffusion autoencoder). The task gives the loss, the
time draws, the training batches, the grids and the evaluation (FD / KID, or the autoencoder's PSNR, with
`train.eval_every`); the trainer's one loop, its optimizer, EMA, checkpoints and logs are the same for both.

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

Preemption (`preemption.StopSignals`): SIGTERM or SIGINT during `train()` finishes the current optimizer step,
writes a checkpoint of it and raises `Preempted`; `--resume` then continues exactly.
"""
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import mindspore as ms
from mindspore import nn
from tqdm.auto import tqdm

from ..checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, save_checkpoint
from ..config import ConfigError
from ..data import iterate
from ..guidance import trained_null_label
from ..latent import diffusion_shape
from ..models import recompute_blocks
from ..pipeline import check_class_rows, create_network
from ..runtime import set_runtime
from ..utils import check_choice
from .adam import adam
from .distributed import download_once
from .ema import EMA
from .lr_schedule import warmup_cosine_lr
from .mixed_precision import build_loss_scaler, mixed_precision
from .preemption import Preempted, StopSignals
from .randomness import TrainingDraws, counters_per_sample
from .step import DataParallelReduce, TrainStep
from .tasks import create_task


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a loss that stays non-finite); the message says what to change."""


def build_optimizer(t, params, lr_values):
    check_choice("train.optimizer", t.optimizer, ("adam", "adamw"))
    lr = ms.Tensor(lr_values)
    if t.optimizer == "adam":
        return adam(params, lr)
    return nn.AdamWeightDecay(params, learning_rate=lr, weight_decay=t.weight_decay, eps=1e-8)


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
        self.model = create_network(cfg)
        self.conditional = self.model.num_class_embeds is not None
        if self.conditional:
            self._take_class_names()
        check_class_rows(self.model, cfg)
        self.task = create_task(self)
        self.null_label = trained_null_label(self.model, cfg)  # None without label dropout
        if t.recompute:
            recompute_blocks(self.model)
        if t.amp_level != "O0":
            self.model = mixed_precision(self.model, t.amp_level, getattr(ms, t.amp_dtype))
        self.loss_fn = self.task.loss(self.model)
        self.lr_values = warmup_cosine_lr(t.lr, t.steps, t.warmup_steps, t.min_lr, t.lr_schedule)
        self.optimizer = build_optimizer(t, self.model.trainable_params(), self.lr_values)
        reduce = DataParallelReduce(self.optimizer.parameters, group_size) if group_size > 1 else None
        if group_size > 1 and cfg.data.download:  # before the ranks' pipelines, which would each download
            download_once(cfg.data.name, cfg.data.root, rank)
        self.ema = EMA(self.model, t.ema_decay, t.ema_warmup) if t.ema_decay > 0 else None
        global_batch = t.batch_size * t.grad_accumulation * group_size
        shape = self.task.noise_shape((t.batch_size,) + diffusion_shape(cfg))
        if global_batch * counters_per_sample(shape) > 2**32:
            raise ConfigError(f"a global batch of {global_batch} images of {shape[1:]} needs more than 2^32 random "
                              "counters per step: lower train.batch_size or train.grad_accumulation")
        try:
            draws = TrainingDraws(t.seed, drop_prob=cfg.diffusion.cond_drop_prob if self.conditional else 0.0,
                                  null_label=self.null_label, **self.task.time_draws)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.step_fn = TrainStep(self.loss_fn, self.optimizer, build_loss_scaler(t), draws, t.grad_clip,
                                 t.grad_accumulation, reduce, rank, self.ema, t.ema_every, jit=t.mode == "graph")
        self.step = 0
        self.log_path = self.output_dir / "train_log.jsonl"
        # FD / KID (the autoencoder: PSNR) every eval_every steps, on rank 0 (the test split read here, once)
        self.evaluation = self.task.evaluation() if t.eval_every and rank == 0 else None

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
        return params + self.task.state_parameters()

    def save(self):
        return save_checkpoint(self.output_dir, self.step, self.state_parameters(), self.cfg.to_yaml(),
                               self.cfg.train.keep_checkpoints)

    def resume(self):
        """Restore the newest checkpoint in output_dir, if any; returns its path or None."""
        checkpoints = list_checkpoints(self.output_dir)
        if not checkpoints:
            return None
        state = load_checkpoint(checkpoints[-1])
        self.cfg.check_resumable(state["config"])
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
        t = self.cfg.train
        shards = dict(num_shards=self.group_size, shard_id=self.rank) if self.group_size > 1 else {}
        ds = self.task.epoch_dataset(0, shards)
        # where self.step left off: this epoch, after `skip` batches
        epoch, skip = divmod(self.step * t.grad_accumulation, ds.get_dataset_size())
        if epoch:
            ds = self.task.epoch_dataset(epoch, shards)
        ds = ds.skip(skip) if skip else ds
        while True:
            for batch in iterate(ds):
                yield batch if self.conditional else (batch[0], None)
            epoch += 1
            ds = self.task.epoch_dataset(epoch, shards)

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

    def copy_weights_to(self, net):
        """Copy the EMA weights (or the raw weights without EMA) into `net`, a network built like the model."""
        if self.ema is not None:
            self.ema.copy_to(net)
        else:
            for src, dst in zip(self.model.trainable_params(), net.trainable_params()):
                dst.set_data(src.value().copy())

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
                self.task.sample_grid(self.output_dir / f"samples_{self.step:08d}.png")
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
