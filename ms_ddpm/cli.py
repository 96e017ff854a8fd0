"""Command line: `ms-ddpm train`, `ms-ddpm sample`, `ms-ddpm evaluate` and `ms-ddpm export`.

Errors a user can fix (bad config, missing data, damaged checkpoint, diverging loss, class labels or a guidance
scale the model cannot take) end with one line on stderr and exit status 2, not a traceback. Sampling and evaluation
rebuild everything from the checkpoint (`ms_ddpm.pipeline.DiffusionPipeline`) and never import the trainer; export
writes it as a diffusers folder (`ms_ddpm.export`).
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError
from .config import Config, ConfigError
from .data import pipeline_error
from .data.fetch import DownloadError
from .processes import PROCESSES
from .samplers import KARRAS_SAMPLERS, SAMPLERS, samplers_for

USER_ERRORS = (ConfigError, CheckpointError, DownloadError, FileNotFoundError, ValueError)


def train_main(args):
    """Returns the exit status: 0 when training finished, 128 + the signal number when a signal stopped it."""
    from .runtime import set_runtime
    from .train.distributed import init_distributed
    from .train.preemption import Preempted
    from .train.trainer import Trainer, TrainingError

    cfg = Config.load(args.config, args.set)
    set_runtime(cfg.train)  # the device must be set before a distributed init
    rank, group_size = init_distributed()
    trainer = Trainer(cfg, rank, group_size)
    if args.resume:
        path = trainer.resume()
        print(f"resumed from {path} at step {trainer.step}" if path else "no checkpoint to resume from: starting")
    try:
        loss = trainer.train()
    except TrainingError as err:
        raise ConfigError(str(err)) from None
    except Preempted as stop:
        if rank == 0:
            again = args.argv + ([] if args.resume else ["--resume"])
            how = (f"resume with: {shlex.join(['ms-ddpm'] + again)}" if group_size == 1 else
                   "resume by relaunching the job with --resume among the train arguments (after -- for the launchers)")
            print(f"ms-ddpm train: {stop}; {how}", file=sys.stderr, flush=True)
        else:
            print(f"rank {rank}: stopped after step {stop.step} with the other ranks", file=sys.stderr, flush=True)
        return 128 + stop.signum  # the shell's status for a process ended by that signal
    print(f"done: step {trainer.step}, loss {loss:.4f}, outputs in {cfg.train.output_dir}")
    return 0


def sample_main(args):
    from .pipeline import DiffusionPipeline, default_sampler
    from .utils import check_int
    from .visualize import save_denoising_animation, save_image_grid

    # checked before the checkpoint is read and anything compiled
    check_int("--num", args.num, 1)
    check_int("--batch-size", args.batch_size, 1)
    check_int("--grid", args.grid, 1)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a folder (new or existing) for samples.npz and samples.png")
    pipe = DiffusionPipeline.from_checkpoint(args.ckpt, not args.no_ema, args.mode, args.device)
    cfg = pipe.config
    name = args.sampler or default_sampler(cfg)
    print(f"{args.ckpt}: step {pipe.checkpoint_step}, {pipe.weights} weights, diffusion.process "
          f"{cfg.diffusion.process}, sampler {name}"
          + (f", {len(pipe.class_names)} classes, guidance scale {args.guidance_scale:g}" if pipe.conditional else ""))
    options = {"eta": args.eta} if name == "ddim" else {}
    if args.karras_sigmas:
        if name not in KARRAS_SAMPLERS:
            raise ValueError(f"--karras-sigmas applies to the samplers {list(KARRAS_SAMPLERS)}, not {name!r}")
        options["karras_sigmas"] = True
    sampler = pipe.create_sampler(name, **options)
    # steps None: the sampler's default, every training timestep / level, or ald's 100 per level
    frames = []

    def keep_first_batch(batch, out):
        if args.gif and batch == 0:
            frames.append(pipe.to_images(out.prev_sample))  # a latent run's latents decoded

    samples, labels = pipe(args.num, args.class_labels, args.guidance_scale, sampler, args.steps, args.seed,
                           args.batch_size, callback=keep_first_batch)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "samples.npz", samples=samples, **({} if labels is None else {"labels": labels}))
    save_image_grid(samples[:args.grid], out / "samples.png", labels=None if labels is None else labels[:args.grid])
    if args.gif:
        save_denoising_animation(frames[:: max(1, len(frames) // 50)] + [frames[-1]], out / "denoising.gif")
    print(f"wrote {len(samples)} samples to {out / 'samples.npz'} and a grid to {out / 'samples.png'}"
          + (" (one row per class)" if labels is not None else "")
          + (f" and {out / 'denoising.gif'}" if args.gif else ""))


def evaluate_main(args):
    from .metrics.evaluate import evaluate, format_report, real_floor
    from .utils import machine_description

    common = dict(num=args.num, batch_size=args.batch_size, seed=args.seed, feature_ckpt=args.features,
                  data_root=args.data_root, mode=args.mode, device=args.device)
    if args.real_floor:
        if args.bpd_batches or args.bpd_ode_batches:
            raise ValueError("--real-floor compares real images only: drop --bpd-batches and --bpd-ode-batches")
        if args.guidance_scale != 1:
            raise ValueError("--real-floor compares real images only: drop --guidance-scale")
        result = real_floor(args.ckpt, **common)
    else:
        result = evaluate(args.ckpt, args.sampler, args.steps, bpd_batches=args.bpd_batches,
                          bpd_ode_batches=args.bpd_ode_batches, bpd_ode_steps=args.bpd_ode_steps,
                          guidance_scale=args.guidance_scale, **common)
    # the command with every option spelled out, defaults included, so the numbers can be reproduced
    options = [(k, v) for k, v in vars(args).items() if k not in ("command", "func", "argv") and v not in (None, False)]
    result["command"] = shlex.join(["ms-ddpm", "evaluate"] + [
        item for k, v in options for item in (["--" + k.replace("_", "-")] + ([] if v is True else [str(v)]))])
    result["machine"] = machine_description()
    for line in format_report(result):
        print(line)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def export_main(args):
    from .export import export_checkpoint

    if Path(args.out).is_file():  # checked before the checkpoint is read
        raise ValueError(f"--out {args.out} is a file; name a folder (new or existing) for the diffusers files")
    written, kind, scale = export_checkpoint(args.ckpt, args.out, use_ema=not args.no_ema)
    print(f"wrote {', '.join(map(str, written))} ({kind} weights of {args.ckpt}"
          + (f"; scaling_factor {scale:.6g}" if scale is not None else "") + ")")


SAMPLER_HELP = "; ".join(f"{name} ({PROCESSES[name].default_sampler}) takes {', '.join(samplers_for(name))}"
                         for name in PROCESSES)


def build_parser():
    parser = argparse.ArgumentParser(prog="ms-ddpm", description="Train and sample DDPMs with MindSpore.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", help="YAML config (configs/*.yaml); omitted: all defaults")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                   help="override config values, e.g. train.steps=200 data.root=/data/mnist")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    p.set_defaults(func=train_main)
    p = sub.add_parser("sample", help="draw samples from a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint written by `ms-ddpm train`")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help=f"default: the process's own; {SAMPLER_HELP}")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: all training timesteps or noise levels, 50 in continuous time, 1 for "
                   "consistency; heun makes 2N - 1 network calls); for ald: Langevin steps per noise level (default "
                   "100, the NCSN paper's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--karras-sigmas", action="store_true",
                   help=f"step on the noise levels of Karras et al. 2022, Eq. 5 (samplers {list(KARRAS_SAMPLERS)})")
    p.add_argument("--class-labels", type=int, nargs="+", default=None, metavar="LABEL",
                   help="class-conditional models: the labels to draw, repeated to fill --num (default: every class "
                   "equally often); samples.npz then holds their `labels` and the grid has one row per class")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance scale w >= 0 (Ho & Salimans 2021, in diffusers' convention: 1 is "
                   "the plain conditional model, larger values favour fidelity to the class over diversity)")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--grid", type=int, default=64, help="samples shown in the PNG grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when the checkpoint has EMA weights")
    p.add_argument("--gif", action="store_true", help="also write the denoising animation of the first batch")
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"])
    p.add_argument("--device", default="CPU", choices=["CPU", "GPU", "Ascend"])
    p.add_argument("--out", default="samples", help="output folder")
    p.set_defaults(func=sample_main)
    p = sub.add_parser("evaluate", help="FD, KID, bits/dim and samples/s of a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint written by `ms-ddpm train`")
    p.add_argument("--sampler", default=None,
                   help=f"default: the process's own (ddim with eta 0 for a DDPM); {SAMPLER_HELP}")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: all training timesteps or noise levels, 50 in continuous time, 1 for "
                   "consistency; ald: 100 per level; heun makes 2N - 1 network calls)")
    p.add_argument("--num", type=int, default=1000, help="number of samples (and of real images for --real-floor)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="class-conditional models: classifier-free guidance scale (1: none); with the MNIST "
                   "classifier as --features, class accuracy is reported beside FD")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--features", default=None,
                   help="feature-extractor checkpoint: the MNIST classifier of scripts/train_classifier.py or the FID "
                   "Inception-v3 of scripts/convert_inception_weights.py; without it FD and KID are computed on raw "
                   "pixels (not comparable to FID)")
    p.add_argument("--data-root", default=None, help="folder of the real data (default: the checkpoint's data.root)")
    p.add_argument("--bpd-batches", type=int, default=0,
                   help="test batches for bits/dim (each costs T network evaluations); 0 skips it")
    p.add_argument("--bpd-ode-batches", type=int, default=0,
                   help="test batches for bits/dim from the probability-flow ODE (Song et al. 2021), on uniformly "
                   "dequantised images; each costs up to 2 x (--bpd-ode-steps - 1) network evaluations with a "
                   "vector-Jacobian product each; 0 skips it")
    p.add_argument("--bpd-ode-steps", type=int, default=100,
                   help="noise levels (uniform in log-SNR) of the ODE solver for --bpd-ode-batches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real-floor", action="store_true",
                   help="instead of sampling: FD / KID of --num real train images vs the test split, for scale")
    p.add_argument("--mode", default="graph", choices=["graph", "pynative"])
    p.add_argument("--device", default="CPU", choices=["CPU", "GPU", "Ascend"])
    p.add_argument("--json", default=None, help="also write the results (and the machine) to this JSON file")
    p.set_defaults(func=evaluate_main)
    p = sub.add_parser("export", help="write a checkpoint as a diffusers folder (a DDPMPipeline, or a vae/)")
    p.add_argument("--ckpt", required=True,
                   help="checkpoint written by `ms-ddpm train` of a model.name ddpm_unet or autoencoder_kl run")
    p.add_argument("--out", required=True,
                   help="folder to write: unet/, scheduler/ and model_index.json (diffusers.DDPMPipeline."
                   "from_pretrained loads it), or vae/ for an autoencoder")
    p.add_argument("--no-ema", action="store_true",
                   help="export the raw weights even when the checkpoint has EMA weights")
    p.set_defaults(func=export_main)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # for the resume command a preempted run prints
    try:
        return args.func(args) or 0
    except USER_ERRORS as err:
        print(f"ms-ddpm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a data pipeline's failure arrives wrapped by MindSpore's engine
        user_error = pipeline_error(err)
        if user_error is None:
            raise
        print(f"ms-ddpm {args.command}: error: {user_error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
