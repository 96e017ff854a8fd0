"""What a run trains: a task gives the trainer's one loop its loss, its draws, its data, its grids and its evaluation.

`DenoisingTask` trains a denoising network on the run's noise process (`diffusion.process`,
`ms_ddpm.processes.PROCESSES`): the loss is `DiffusionLoss` on the process's `training_terms`, the time of each
sample is an integer label drawn uniformly for the discrete processes (Algorithm 1 of Ho et al. 2020; NCSN's level
indices) or the process's own `training_time` for the continuous ones; its grids are samples of the EMA weights and
its evaluation FD and KID (`evaluation.TrainingEvaluation`). In a latent run (`latent.autoencoder`) it encodes the
training split once into a latent cache (`ms_ddpm.latent`; the posterior means), resolves `latent.scaling_factor:
auto` to 1 / std of those latents (for a converted VAE: its own factor), stores it and the autoencoder's arguments in
the run's config, trains on batches of the cache, and puts the autoencoder's weights into every checkpoint, so
sampling decodes from the checkpoint alone.

`AutoencoderTask` (`model.name: autoencoder_kl`) trains the latent-diffusion autoencoder: `AutoencoderLoss`
(reconstruction + `autoencoder.kl_weight` x KL; the eps of its posterior sample drawn in the step like a diffusion's
noise, so resume stays exact); its grids are reconstructions of test images and its evaluation the test split's PSNR
(`evaluation.ReconstructionEvaluation`).
"""
import numpy as np

from ..config import AutoencoderConfig, ConfigError, DiffusionConfig
from ..data import create_dataset
from ..latent import FirstStage, encode_split, load_autoencoder, resolve_scaling_factor
from ..losses import AutoencoderLoss, DiffusionLoss
from ..metrics.evaluate import real_images
from ..models import AutoencoderKL, apply_batched, create_model
from ..pipeline import DiffusionPipeline, build_sampler, check_image_size, create_network
from ..processes import create_process
from ..visualize import save_image_grid
from .evaluation import ReconstructionEvaluation, TrainingEvaluation


def create_task(trainer):
    """The task of the trainer's model: `AutoencoderTask` for an `AutoencoderKL`, else `DenoisingTask`."""
    return (AutoencoderTask if isinstance(trainer.model, AutoencoderKL) else DenoisingTask)(trainer)


class Task:
    """The part of a run that depends on what it trains. Built by the trainer once its model exists (before mixed
    precision); `loss(model)` is called with the network to train (after it).

    Attributes:
        time_draws: the `TrainingDraws` arguments of the step's time (`num_labels`, `training_time`).
    """

    def __init__(self, trainer):
        self.trainer, self.cfg = trainer, trainer.cfg
        self.check_sections()

    def check_sections(self):
        """Refuse settings of a latent run without its autoencoder, and a latent run's random flips (flipped
        latents are not the latents of flipped images)."""
        lat = self.cfg.latent
        if lat.autoencoder is None and (lat.autoencoder_kwargs is not None or lat.scaling_factor != "auto"):
            raise ConfigError("latent.scaling_factor and latent.autoencoder_kwargs belong to a latent run: set "
                              "latent.autoencoder (the autoencoder's checkpoint) or drop them")
        if lat.autoencoder and self.cfg.data.random_flip:
            raise ConfigError("data.random_flip with latent.autoencoder: the latent cache is encoded once, unflipped; "
                              "set data.random_flip: false")

    def noise_shape(self, shape):
        """The shape of the noise the step draws for a batch of `shape`."""
        return shape

    def epoch_dataset(self, epoch, shards):
        """The training batches of epoch `epoch` (shuffled with seed + epoch), a `mindspore.dataset` pipeline."""
        c, t = self.cfg.data, self.cfg.train
        labels = dict(labels=True) if self.trainer.conditional else {}  # the labels column only where it is used
        return create_dataset(c.name, c.root, "train", c.image_size, c.channels, t.batch_size, shuffle=True,
                              random_flip=c.random_flip, download=c.download, seed=t.seed + epoch,
                              num_parallel_workers=c.num_parallel_workers, **shards, **labels)

    def state_parameters(self):
        """Parameters the task adds to every checkpoint."""
        return []


class DenoisingTask(Task):
    """A denoising network on the run's process (the module docstring). Attributes: `process`, `grid_sampler`,
    `first_stage` and `latents` (the latent run's decoder and latent cache; None in pixel space)."""

    def __init__(self, trainer):
        super().__init__(trainer)
        cfg = self.cfg
        self.first_stage, self.latents = self._encode_latents() if cfg.latent.autoencoder else (None, None)
        self.process = create_process(cfg.diffusion, latent=self.first_stage is not None)
        if not self.process.trained_by_denoising:
            raise ConfigError(f"diffusion.process {cfg.diffusion.process!r} is not trained by the denoising loss, and "
                              "its own training (consistency distillation, Song et al. 2023) is not built yet")
        check_image_size(trainer.model, cfg)
        discrete = self.process.num_timesteps is not None
        self.time_draws = dict(num_labels=self.process.num_timesteps if discrete else None,
                               training_time=None if discrete else self.process.training_time)
        # built now, so a sampler that does not fit the process or a bad step count fails before training
        self.grid_sampler = self._grid_sampler()
        self.grid_pipeline = None  # the sampling network, built at the first grid and reused for every later one

    def check_sections(self):
        super().check_sections()
        if self.cfg.autoencoder != AutoencoderConfig():
            raise ConfigError("the autoencoder section sets the loss of model.name autoencoder_kl runs; drop it for "
                              f"model.name {self.cfg.model.name!r} (latent diffusion takes a trained one: "
                              "latent.autoencoder)")

    def loss(self, model):
        # the loss settings are process ddpm's (DDPMConfig.loss_options); the other processes have none
        return DiffusionLoss(model, self.process, **getattr(self.cfg.diffusion.settings, "loss_options", dict)())

    def _grid_sampler(self):
        t = self.cfg.train
        try:
            sampler = build_sampler(self.cfg, self.process, t.sampler)
            sampler.set_timesteps(t.sample_steps)
        except ValueError as err:  # ConfigError included
            raise ConfigError(f"train.sampler={t.sampler!r}, train.sample_steps={t.sample_steps!r}: {err}") from None
        return sampler

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
        network_channels = getattr(self.trainer.model, "channels", None)
        if network_channels != autoencoder.latent_channels:
            raise ConfigError(f"latent.autoencoder {lat.autoencoder} has {autoencoder.latent_channels} latent "
                              f"channels, the network takes {network_channels}: set model.kwargs.channels: "
                              f"{autoencoder.latent_channels}")
        lat.autoencoder_kwargs = kwargs
        cache = encode_split(autoencoder, cfg.data, "train", labels=self.trainer.conditional)
        lat.scaling_factor = resolve_scaling_factor(lat.scaling_factor, autoencoder, lambda: cache.latents)
        if self.trainer.rank == 0:
            print(f"latent cache: {cache.latents.shape[0]} latents of {cache.latents.shape[1:]}, std "
                  f"{cache.latents.std():.4f} (posterior std {cache.posterior_std:.4f}), scaling_factor "
                  f"{lat.scaling_factor:.6g}", flush=True)
        return FirstStage(autoencoder, lat.scaling_factor), cache

    def epoch_dataset(self, epoch, shards):
        if self.latents is None:
            return super().epoch_dataset(epoch, shards)
        t = self.cfg.train  # the cache: no encoder runs here
        return self.latents.dataset(t.batch_size, self.cfg.latent.scaling_factor, seed=t.seed + epoch, **shards)

    def state_parameters(self):
        # "autoencoder.*": sampling decodes from the checkpoint alone
        return [] if self.first_stage is None else list(self.first_stage.get_parameters())

    def sampling_pipeline(self):
        """The run's sampling pipeline with the EMA weights (or the raw weights without EMA) copied in.

        Its network is built once, at the first call, and reused by every sample grid and evaluation: graph mode
        compiles its sampling step once per run, not once per grid (which kept the other ranks waiting in their
        all-reduce for every compile).
        """
        if self.grid_pipeline is None:
            self.grid_pipeline = DiffusionPipeline(create_network(self.cfg), self.process, self.cfg, self.first_stage)
        self.trainer.copy_weights_to(self.grid_pipeline.network)
        return self.grid_pipeline

    def sample_grid(self, path):
        """A grid of samples, one row per class for a class-conditional model (plain conditional sampling,
        guidance scale 1)."""
        t = self.cfg.train
        samples, labels = self.sampling_pipeline()(t.num_samples, sampler=self.grid_sampler, seed=t.seed,
                                                   batch_size=t.num_samples, progress=False)
        save_image_grid(samples, path, labels=labels)

    def evaluation(self):
        return TrainingEvaluation(self.cfg, self.process)


class AutoencoderTask(Task):
    """The latent-diffusion autoencoder (the module docstring)."""

    time_draws = dict(num_labels=1)  # no timesteps: the step's t is drawn and unused

    def __init__(self, trainer):
        super().__init__(trainer)
        self._test_split = None  # the test images, read at first use
        self.eval_network = None  # the copy for reconstructions (EMA weights), built at first use

    def check_sections(self):
        super().check_sections()
        cfg = self.cfg
        default = DiffusionConfig().to_dict()
        unused = [f"diffusion.{k}" for k, v in cfg.diffusion.to_dict().items() if default.get(k) != v]
        unused += ["latent.autoencoder"] if cfg.latent.autoencoder else []
        if unused:
            raise ConfigError(f"{', '.join(unused)}: model.name autoencoder_kl trains the autoencoder, not a "
                              "diffusion; drop them")

    def loss(self, model):
        return AutoencoderLoss(model, self.cfg.autoencoder.loss_type, self.cfg.autoencoder.kl_weight)

    def noise_shape(self, shape):
        return self.trainer.model.latent_shape(shape)  # the eps of the posterior sample

    def test_images(self):
        """The test split (N, C, H, W) in [-1, 1], read once: the grids and the PSNR."""
        if self._test_split is None:
            self._test_split = real_images(self.cfg, None, "test", self.cfg.train.eval_batch_size)
        return self._test_split

    def reconstruction_network(self):
        """The run's copy of the autoencoder (built once, inference mode) with the EMA weights."""
        if self.eval_network is None:
            self.eval_network = create_model(self.cfg.model.name, **self.cfg.model.kwargs)
            self.eval_network.set_train(False)
        self.trainer.copy_weights_to(self.eval_network)
        return self.eval_network

    def sample_grid(self, path):
        """Rows of test images alternating with their reconstructions."""
        t = self.cfg.train
        images = self.test_images()[:t.num_samples]
        reconstructions = apply_batched(self.reconstruction_network(), images, t.eval_batch_size)
        rows = [row for s in range(0, len(images), 8) for row in (images[s:s + 8], reconstructions[s:s + 8])]
        save_image_grid(np.concatenate(rows), path, nrow=min(8, len(images)))

    def evaluation(self):
        return ReconstructionEvaluation(self.test_images(), self.cfg.train.eval_batch_size)
