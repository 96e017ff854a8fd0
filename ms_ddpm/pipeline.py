"""One object that generates: a trained network, the noise process it was trained on, and the run's config.

    pipe = DiffusionPipeline.from_checkpoint("outputs/mnist5k_cond/ckpt_00001200.ckpt")
    samples, labels = pipe(20, class_labels=[3, 7], guidance_scale=2.0, sampler="ddim", steps=50, seed=0)
    # samples: float32 (20, C, H, W) in [-1, 1]; labels: int32 (20,), 3 7 3 7 ... (None for an unconditional model)

Shaped after diffusers' `DDPMPipeline` (network + scheduler, `__call__` runs the loop) and mindone's DiT inference
pipeline (class labels and their null label on the doubled batch), smaller: the samplers already own the loop
(`Sampler.sample_progressive`), so the pipeline chooses the labels, the guided network and the sampler, and draws
batch i from the seed `seed + i` (the same arguments give the same samples, in either execution mode up to float32
rounding). `ms-ddpm sample`, `ms-ddpm evaluate` and the trainer's sample grids generate through it.

`DiffusionPipeline.from_pretrained(folder)` reads a diffusers DDPMPipeline folder (`ms_ddpm.diffusers_format`) as
it is, e.g. a downloaded google/ddpm-cifar10-32; `ms-ddpm export` writes one from a checkpoint.

Latent diffusion (`ms_ddpm.latent`): for a run with a `latent` section the pipeline also holds the autoencoder's
decoder (`FirstStage`, its weights from the checkpoint's "autoencoder.*" entries): it samples latents and returns
their decoded images, so everything downstream (grids, `ms-ddpm evaluate`) sees images as from a pixel model.

Class conditioning: the config's `data.class_names` are the classes (label i is class_names[i]); the network has a
class embedding of `num_class_embeds` rows. Classifier-free guidance (`ms_ddpm.guidance`) needs a null label, row
`num_classes`, that training used (`diffusion.cond_drop_prob` > 0).
"""
import mindspore as ms
import numpy as np

from .checkpoint import CheckpointError, load_checkpoint, load_weights
from .config import Config, ConfigError
from .diffusers_format import read_ddpm_pipeline
from .guidance import ClassifierFreeGuidance, trained_null_label
from .latent import FirstStage, diffusion_shape
from .models import AutoencoderKL, create_model
from .models.ddpm_unet import load_diffusers_weights
from .models.state_dict import StateDictError
from .processes import PROCESSES, create_process
from .runtime import set_runtime
from .samplers import Sampler, create_sampler, samplers_for
from .utils import check_int


def default_sampler(cfg):
    """The sampler used unless one is named: the process's own (`Process.default_sampler`: DDIM for a DDPM,
    annealed Langevin for an NCSN, Heun for EDM, Euler for flow)."""
    return PROCESSES[cfg.diffusion.process].default_sampler


def build_sampler(cfg, process, name=None, **kwargs):
    """Sampler `name` (None: `default_sampler`) for a network trained with `cfg`, on `process` (its
    `create_process`); kwargs go to the sampler's constructor. A sampler that does not run the process is refused
    (a ConfigError naming those that do); "ald" takes the config's Langevin step size."""
    name = default_sampler(cfg) if name is None else name
    valid = samplers_for(cfg.diffusion.process)
    if name not in valid:
        raise ConfigError(f"sampler {name!r} does not sample a network of diffusion.process "
                          f"{cfg.diffusion.process!r}; use one of {list(valid)}")
    if name == "ald":
        kwargs["step_lr"] = cfg.diffusion.langevin_step_lr
    return create_sampler(name, process, **kwargs)


# the denoising networks' (input channels, output channels) constructor arguments
OUTPUT_CHANNELS = {"unet": ("channels", "out_dim"), "ddpm_unet": ("in_channels", "out_channels")}


def network_kwargs(cfg):
    """The constructor arguments of the run's network: `model.kwargs`, with the output channels of a learned
    variance (the prediction and the variance's v: twice the input channels, `ms_ddpm.processes.split_output`)
    filled in, so a config never doubles them by hand; a config that sets them otherwise is refused."""
    kwargs = dict(cfg.model.kwargs)
    learned = getattr(cfg.diffusion.settings, "variance_type", None) == "learned_range"
    if not learned or cfg.model.name not in OUTPUT_CHANNELS:
        return kwargs
    channels_key, out_key = OUTPUT_CHANNELS[cfg.model.name]
    channels = kwargs.get(channels_key, 3)  # both networks default to RGB
    if kwargs.get(out_key) not in (None, 2 * channels):
        raise ConfigError(f"model.kwargs.{out_key}={kwargs[out_key]}: with diffusion.variance_type learned_range "
                          f"the network outputs the prediction and its variance, {2 * channels} channels; drop it")
    kwargs[out_key] = 2 * channels
    return kwargs


def create_network(cfg):
    """The run's network, built from `network_kwargs(cfg)`."""
    return create_model(cfg.model.name, **network_kwargs(cfg))


def check_class_rows(network, cfg):
    """Refuse a network whose class embedding does not fit the config's classes and label dropout.

    A class-conditional network needs a row per class of `cfg.data.class_names` plus the null row (K = classes + 1);
    K = classes (no null row, e.g. a converted diffusers model) is accepted only without label dropout. An
    unconditional network takes neither class names nor label dropout.
    """
    rows = getattr(network, "num_class_embeds", None)
    names, drop = cfg.data.class_names, cfg.diffusion.cond_drop_prob
    if rows is None:
        if drop:
            raise ConfigError(f"diffusion.cond_drop_prob={drop} needs a class-conditional model: set "
                              "model.kwargs.num_classes (unet) or num_class_embeds (ddpm_unet), or drop it")
        if names:
            raise ConfigError("data.class_names is set but the model is unconditional: set model.kwargs.num_classes "
                              "(unet) or num_class_embeds (ddpm_unet), or drop data.class_names")
        return
    if not names:
        raise ConfigError("a class-conditional model needs data.class_names (the trainer takes them from the data)")
    n = len(names)
    if rows not in (n, n + 1) or (rows == n and drop):
        raise ConfigError(f"the model has {rows} class embedding rows, the data {n} classes: set "
                          f"model.kwargs.num_classes: {n} (unet) or num_class_embeds: {n + 1} (ddpm_unet; one row "
                          "per class and the null label that diffusion.cond_drop_prob trains)")


def check_image_size(network, cfg):
    """Refuse a `data.image_size` the network cannot take (for a latent run: the size of its latents), before any
    graph is compiled."""
    _, height, width = diffusion_shape(cfg)
    try:
        network.check_image_size(height, width)
    except ValueError as err:
        latent = f" (latents of {height}x{width})" if cfg.latent.autoencoder_kwargs is not None else ""
        raise ConfigError(f"data.image_size={cfg.data.image_size}{latent}: {err}") from None


class DiffusionPipeline:
    """network + process + config -> samples; see the module docstring.

    Args:
        network: the denoising network (inference mode is set here); class-conditional or not.
        process: its noise process (`create_process(config.diffusion)`).
        config: the run's `Config` (its data section gives the image shape and the class names).
        first_stage: for a latent run, its `FirstStage` (the decoder of the latents); None in pixel space.
    """

    def __init__(self, network, process, config, first_stage=None):
        check_class_rows(network, config)
        check_image_size(network, config)
        if (first_stage is None) != (config.latent.autoencoder_kwargs is None):
            raise ValueError("a latent run's pipeline needs its first stage (FirstStage), a pixel run's none")
        network.set_train(False)
        self.network, self.process, self.config = network, process, config
        self.first_stage = first_stage
        if first_stage is not None:
            first_stage.set_train(False)
        self._guided = None
        #: the checkpoint's step and "ema" or "raw" weights, when built by `from_checkpoint`
        self.checkpoint_step, self.weights = None, None

    @classmethod
    def from_checkpoint(cls, path, use_ema=True, mode="graph", device="CPU"):
        """Rebuild a trained pipeline from a checkpoint of `ms-ddpm train` alone (its stored config).

        The weights are the EMA weights when `use_ema` and the checkpoint has them, else the raw weights (said by
        `.weights`). `mode` ("graph" / "pynative") and `device` are set for the process.
        """
        state = load_checkpoint(path)
        cfg = Config.from_stored(state["config"])
        if cfg.model.name == "autoencoder_kl":
            raise CheckpointError(f"{path} is an autoencoder's checkpoint: it encodes and decodes, it does not "
                                  "sample; train a diffusion model on its latents (latent.autoencoder) and sample that")
        # sampling runs in float32: the training precision does not apply (nor its device limits)
        cfg.train.mode, cfg.train.device, cfg.train.amp_level = mode, device, "O0"
        set_runtime(cfg.train)
        net = create_network(cfg)
        kind = load_weights(net, state, path, use_ema)
        first_stage = None
        if cfg.latent.autoencoder_kwargs is not None:  # its weights travel in the checkpoint, never trained
            first_stage = FirstStage(AutoencoderKL(**cfg.latent.autoencoder_kwargs), cfg.latent.scaling_factor)
            stage = {p.name: p for p in first_stage.get_parameters()}
            missing = [n for n in stage if n not in state]
            if missing:
                raise CheckpointError(f"{path} lacks the autoencoder weights {missing[:3]}... of its latent run")
            ms.load_param_into_net(first_stage, {n: ms.Parameter(state[n].value(), name=n) for n in stage},
                                   strict_load=True)
        pipe = cls(net, create_process(cfg.diffusion, latent=first_stage is not None), cfg, first_stage)
        pipe.checkpoint_step, pipe.weights = state["step"], kind
        return pipe

    @classmethod
    def from_pretrained(cls, path, mode="graph", device="CPU"):
        """A pipeline from a diffusers `DDPMPipeline` folder (model_index.json, unet/, scheduler/), e.g. a
        downloaded google/ddpm-cifar10-32 or one `ms-ddpm export` wrote, without a conversion step.

        The config is the folder's (`ms_ddpm.diffusers_format.read_ddpm_pipeline`): a DDPMUNet with the arguments of
        unet/config.json, the chain of scheduler/scheduler_config.json, the image shape of the UNet; a
        class-conditional UNet's labels are named "0" ... "K-1", and it samples without guidance (a diffusers folder
        names no null label). Raises ConversionError (a ConfigError) for a setting ms_ddpm cannot represent,
        StateDictError for a missing or unreadable file.
        """
        cfg, state_dict = read_ddpm_pipeline(path)
        cfg.train.mode, cfg.train.device = mode, device
        set_runtime(cfg.train)
        net = create_network(cfg)
        try:
            load_diffusers_weights(net, state_dict)
        except ValueError as err:
            raise StateDictError(f"{path}: the UNet's weights do not fit its config.json: {err}") from None
        return cls(net, create_process(cfg.diffusion), cfg)

    # --- conditioning --------------------------------------------------------------------------------------------
    @property
    def class_names(self):
        """Class names in label order, or None for an unconditional model."""
        return self.config.data.class_names if self.conditional else None

    @property
    def conditional(self):
        return getattr(self.network, "num_class_embeds", None) is not None

    @property
    def null_label(self):
        """The label of the unconditional branch, or None when the network has no trained null row."""
        return trained_null_label(self.network, self.config)

    def labels(self, num_samples, class_labels=None):
        """The (num_samples,) int32 labels of a draw: `class_labels` repeated to fill it, or, when None, every class
        equally often (0, 1, ..., C - 1, 0, 1, ...); None for an unconditional model."""
        if not self.conditional:
            if class_labels is not None:
                raise ValueError("class labels given, but the model is unconditional (trained without labels): "
                                 "drop --class-labels")
            return None
        n = len(self.class_names)
        if class_labels is None:
            return (np.arange(num_samples) % n).astype(np.int32)
        labels = np.asarray(class_labels)
        if labels.ndim != 1 or len(labels) == 0 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"class labels must be a non-empty list of integers, got {class_labels!r}")
        bad = sorted({int(v) for v in labels if not 0 <= v < n})
        if bad:
            raise ValueError(f"class label(s) {bad} outside the model's {n} classes 0..{n - 1} "
                             f"({', '.join(f'{i}: {name}' for i, name in enumerate(self.class_names))})")
        return np.resize(labels, num_samples).astype(np.int32)

    def guided(self, guidance_scale):
        """The network to sample with at `guidance_scale`: the network itself at 1 (no doubled batch), else its
        `ClassifierFreeGuidance` (one Cell, kept and re-scaled, so graph mode compiles it once)."""
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 0:
            raise ValueError(f"guidance scale must be a number >= 0 (1: no guidance), got {guidance_scale!r}")
        if guidance_scale == 1:
            return self.network
        if not self.conditional:
            raise ValueError(f"guidance scale {guidance_scale} needs a class-conditional model; this one is "
                             "unconditional: use guidance scale 1")
        if self.null_label is None:
            raise ValueError(f"guidance scale {guidance_scale} needs the null label of classifier-free guidance, "
                             "which this model was not trained on (diffusion.cond_drop_prob 0, or no null row): use "
                             "guidance scale 1")
        if self._guided is None:
            self._guided = ClassifierFreeGuidance(self.network, self.null_label, guidance_scale,
                                                  self.process.learned_variance)
        else:
            self._guided.set_guidance_scale(guidance_scale)
        return self._guided

    @property
    def sample_shape(self):
        """(C, H, W) of what the samplers draw: the images, or a latent run's latents."""
        return diffusion_shape(self.config)

    def to_images(self, x):
        """Samplers' output (a (B,) + sample_shape tensor) -> images (B, C, H, W) as NumPy: the latents decoded
        (`FirstStage`) for a latent run, else x itself."""
        return (x if self.first_stage is None else self.first_stage(x)).asnumpy()

    def create_sampler(self, name=None, **kwargs):
        """A sampler of this pipeline's process (`build_sampler`)."""
        return build_sampler(self.config, self.process, name, **kwargs)

    # --- generation ----------------------------------------------------------------------------------------------
    def __call__(self, num_samples, class_labels=None, guidance_scale=1.0, sampler=None, steps=None, seed=0,
                 batch_size=64, progress=True, callback=None):
        """Draw `num_samples` images.

        Args:
            num_samples: images to draw.
            class_labels: labels to draw (repeated to fill num_samples); None: every class equally often.
            guidance_scale: classifier-free guidance scale w >= 0 (diffusers' convention; 1: none).
            sampler: a sampler name (None: `default_sampler`) or a `Sampler` of this process.
            steps: `set_timesteps(steps)` first; None: the sampler's own.
            seed: batch i is drawn from seed + i.
            batch_size: images per batch (the last one may be smaller).
            progress: show the sampler's progress bar.
            callback: called as callback(batch_index, SamplerOutput) after every step (e.g. for an animation); a
                latent run's outputs are latents (`to_images` decodes them).

        Returns:
            (samples, labels): float32 (N, C, H, W) clipped to [-1, 1], and int32 (N,) labels or None.
        """
        num_samples = check_int("num_samples", num_samples, 1)
        batch_size = check_int("batch_size", batch_size, 1)
        labels = self.labels(num_samples, class_labels)
        model = self.guided(guidance_scale)
        chain = sampler if isinstance(sampler, Sampler) else self.create_sampler(sampler)
        if steps is not None:
            chain.set_timesteps(steps)
        samples = []
        for i, start in enumerate(range(0, num_samples, batch_size)):
            n = min(batch_size, num_samples - start)
            cond = None if labels is None else ms.Tensor(labels[start:start + n])
            shape = (n,) + self.sample_shape
            for out in chain.sample_progressive(model, shape, seed=seed + i, progress=progress, cond=cond):
                if callback is not None:
                    callback(i, out)
            samples.append(self.to_images(out.prev_sample))
        return np.clip(np.concatenate(samples), -1.0, 1.0), labels
