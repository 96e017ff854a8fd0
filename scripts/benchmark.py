"""Training and sampling throughput of ms_ddpm on this machine, with the same U-Net in PyTorch as the yardstick.

    python scripts/benchmark.py --config configs/unet_mnist5k_cpu.yaml --batch-size 32 [--json out.json]

What one run measures (each phase in its own subprocess, so that its peak RSS is its own):
  - training img/s with the library's real step (`Trainer(cfg).step_fn`: value_and_grad, loss scaler, clipping,
    the config's optimizer and loss, and the EMA update inside it when the config has `ema_decay`), compiled
    (GRAPH_MODE, jit) and op by op (PYNATIVE_MODE), on random images of the config's size; data loading is not
    included;
  - sampling img/s in GRAPH_MODE (network compiled) for DDPM (`--ddpm-steps`, default T), DDIM-50 and, when the
    library has it, DPM-Solver-20: seconds per sampling step, timed over `--steps-per-repeat` steps of a chain and
    multiplied by the step count (a sampling step costs about the same at every t: one network call plus the update;
    the output says when it extrapolated);
  - the same U-Net in PyTorch eager (`tests/torch_unet.py`, same shapes, batch, optimizer, loss and EMA, the EMA
    updated with `torch._foreach_lerp_` as diffusers' `EMAModel(foreach=True)` does): training and DDIM-50 sampling
    img/s, and the ratios MindSpore / PyTorch;
  - forward FLOPs per image (2 x multiply-accumulates of convolutions, dense layers and attention matmuls;
    norms, activations and softmax not counted), checked against torch's FlopCounterMode when torch is present,
    and the fraction of this machine's float32 matmul throughput (measured in the same run) each row achieves,
    taking a training step as 3 x the forward FLOPs;
  - peak RSS of each phase's process: interpreter, framework, model, graph compilation and the measured loop
    (the RSS right after the imports is given too).
Timings are medians over `--repeats` after `--warmup` steps; the warm-up includes graph compilation, whose cost
(first call minus a steady step) is reported on its own. The headline line gives the figures the project's targets
are stated in: graph training and DDIM-50 against PyTorch, graph training's first step (compilation included) and
its process's peak RSS. `MS_DDPM_KERNELS=0` runs MindSpore's native ops instead of ms_ddpm's CPU kernels.

This file measures; `benchmark_report.py` beside it builds, prints and writes the report.
"""
import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from benchmark_report import build_report, print_report  # beside this script, on sys.path when it runs

from ms_ddpm.utils import machine_description  # imports no MindSpore: the parent runs torch

DDIM_STEPS = 50
DPM_SOLVER_STEPS = 20
MATMUL_SIZE = 2048

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (model, diffusion, data size, optimizer, loss)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: the config's)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    p.add_argument("--steps-per-repeat", type=int, default=10,
                   help="training steps, or sampling steps of a chain, timed in each repeat")
    p.add_argument("--ddpm-steps", type=int, default=None,
                   help="DDPM sampling steps the img/s figure is for (default: the config's T)")
    p.add_argument("--skip-torch", action="store_true", help="leave out the PyTorch rows")
    p.add_argument("--threads", type=int, default=None,
                   help="MindSpore's runtime_num_threads and torch.set_num_threads (default: each framework's own "
                        "choice, reported); MindSpore's oneDNN convolutions may still use every core")
    p.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                   help="config overrides, as for ms-ddpm train (e.g. train.recompute=true)")
    p.add_argument("--phases", nargs="+", default=None, choices=sorted(PHASES), metavar="PHASE",
                   help=f"run only these phases (default: all; choices {', '.join(PHASES)})")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: run one phase in this process
    p.add_argument("--phase-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("repeats", "warmup", "steps_per_repeat"):
        minimum = 0 if name == "warmup" else 1
        if getattr(args, name) < minimum:
            p.error(f"--{name.replace('_', '-')} must be >= {minimum}")
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by the phases


def rss_mib():
    """Current resident set size of this process in MiB (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mib():
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_config(args):
    from ms_ddpm.config import Config

    cfg = Config.load(args.config, args.set)
    if args.batch_size is not None:
        cfg.train.batch_size = args.batch_size
    return cfg


def image_shape(cfg):
    return (cfg.train.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)


def measure(args, warm, timed, steps_per_repeat):
    """Call warm(i) for i < args.warmup (untimed; the first call compiles), then timed() args.repeats times.

    `timed()` runs `steps_per_repeat` steps and must wait for their results. Returns (seconds of the first warm-up
    call or None, median seconds per step, seconds per step of each repeat, CPU use while timing).
    """
    first = None
    for i in range(args.warmup):
        start = time.perf_counter()
        warm(i)
        if i == 0:
            first = time.perf_counter() - start
    per_step = []
    with CpuMeter() as cpu:
        for _ in range(args.repeats):
            start = time.perf_counter()
            timed()
            per_step.append((time.perf_counter() - start) / steps_per_repeat)
    return first, statistics.median(per_step), per_step, cpu.value


class CpuMeter:
    """CPU seconds this process used per wall-clock second while timing: about the thread count on an idle
    machine; much less means the benchmark was starved by other work on the machine."""

    def __enter__(self):
        self.cpu, self.wall = _cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.value = (_cpu_seconds() - self.cpu) / max(time.perf_counter() - self.wall, 1e-9)


def _cpu_seconds():
    t = os.times()
    return t.user + t.system


def result(measured, batch, steps_per_image_batch=1, **extra):
    """A row from `measure`'s figures: img/s from the median seconds per step and the steps one batch of images
    takes."""
    first_call, seconds_per_step, per_call, cpu_use = measured
    out = {
        "img_per_s": batch / (seconds_per_step * steps_per_image_batch),
        "seconds_per_step": seconds_per_step,
        "seconds_per_step_repeats": list(per_call),
        "first_call_s": first_call,
        # graph compilation and other one-off costs (allocations, kernel selection): first call minus a steady one
        "compile_s": None if first_call is None else max(first_call - seconds_per_step, 0.0),
        "cpu_seconds_per_second": cpu_use,
    }
    out.update(extra)
    return out


def progress(msg):
    print(f"[benchmark] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# MindSpore phases


def set_mindspore_threads(args):
    import mindspore as ms

    if args.threads is not None:
        ms.set_context(runtime_num_threads=args.threads)
    return ms.get_context("runtime_num_threads")


def phase_ms_train(args, mode):
    """Training steps of the library's Trainer (its TrainStep, optimizer, loss scaler and loss) on random images."""
    import mindspore as ms

    from ms_ddpm.train.trainer import Trainer

    cfg = load_config(args)
    cfg.train.mode = mode
    # the learning-rate table must cover every step taken here
    cfg.train.steps = max(cfg.train.steps, args.warmup + args.repeats * args.steps_per_repeat + 1)
    rss_after_imports = rss_mib()
    threads = set_mindspore_threads(args)
    trainer = Trainer(cfg)  # sets device and mode, seeds, builds model, loss, optimizer and TrainStep
    trainer.model.set_train(True)
    rng = np.random.default_rng(cfg.train.seed)
    shape = image_shape(cfg)
    images = ms.Tensor(rng.uniform(-1, 1, shape).astype(np.float32))
    losses = []

    def steps(n):
        # as Trainer.train: t and noise drawn inside the step, each step waiting for its dispatch (TrainStep), the
        # loss read back once (the trainer reads it at logging steps)
        for _ in range(n):
            loss, _, _ = trainer.step_fn(images)
        losses.append(float(loss.asnumpy()))

    progress(f"MindSpore training, {mode} mode, batch {shape[0]}")
    measured = measure(args, lambda i: steps(1), lambda: steps(args.steps_per_repeat), args.steps_per_repeat)
    n_params = sum(p.size for p in trainer.model.trainable_params())
    out = {"ms_train_" + mode: result(measured, shape[0], loss_finite=bool(np.isfinite(losses).all()),
                                      optimizer=cfg.train.optimizer, loss_type=cfg.diffusion.loss_type,
                                      amp_level=cfg.train.amp_level)}
    extra = {"parameters": int(n_params), "runtime_num_threads": threads, "kernels": kernels_used()}
    if mode == "pynative":  # the FLOP count needs PyNative hooks: done here, on a separate batch-1 copy
        extra["flops_per_image_forward"] = count_flops_mindspore(cfg)
    return out, extra, rss_after_imports


def phase_ms_train_loop(args):
    """The trainer's own loop (`Trainer.train`, GRAPH_MODE) on the config's data, logging every
    `train.log_every` steps, no checkpoints, grids or evaluations: the wall time per step split into the compiled
    step's calls (each followed by a synchronize, so that the device work they queued is theirs), waiting for the
    data pipeline, and the rest: the loop's own host work per step (draws, copies, read-backs, logging, and on
    versions that run it separately the EMA update's graph call)."""
    import mindspore as ms

    from ms_ddpm.train.trainer import Trainer

    cfg = load_config(args)
    cfg.train.mode = "graph"
    timed_steps = args.repeats * args.steps_per_repeat
    cfg.train.steps = max(cfg.train.steps, args.warmup + timed_steps + 1)
    cfg.train.save_every = cfg.train.sample_every = cfg.train.eval_every = 0
    rss_after_imports = rss_mib()
    threads = set_mindspore_threads(args)
    with tempfile.TemporaryDirectory() as out:
        cfg.train.output_dir = out
        trainer = Trainer(cfg)
        step_fn, batches = trainer.step_fn, trainer.batches
        spent = {"step": 0.0, "data": 0.0}

        class TimedStep:
            def __getattr__(self, name):
                return getattr(step_fn, name)

            def __call__(self, *a, **kw):
                start = time.perf_counter()
                out = step_fn(*a, **kw)
                ms.runtime.synchronize()
                spent["step"] += time.perf_counter() - start
                return out

        def timed_batches():
            data = batches()
            while True:
                start = time.perf_counter()
                batch = next(data)
                spent["data"] += time.perf_counter() - start
                yield batch

        trainer.step_fn, trainer.batches = TimedStep(), timed_batches
        progress(f"MindSpore training loop (Trainer.train), graph mode, batch {cfg.train.batch_size}")
        start = time.perf_counter()
        trainer.train(until=max(args.warmup, 1))  # compiles
        first = time.perf_counter() - start
        spent.update(step=0.0, data=0.0)
        with CpuMeter() as cpu:
            start = time.perf_counter()
            trainer.train(until=trainer.step + timed_steps)
            wall = time.perf_counter() - start
    per_step = wall / timed_steps
    row = {"img_per_s": cfg.train.batch_size * cfg.train.grad_accumulation / per_step, "seconds_per_step": per_step,
           "first_call_s": first, "compile_s": None, "cpu_seconds_per_second": cpu.value,
           "step_call_ms_per_step": spent["step"] / timed_steps * 1e3,
           "data_ms_per_step": spent["data"] / timed_steps * 1e3,
           "host_ms_per_step": (wall - spent["step"] - spent["data"]) / timed_steps * 1e3,
           "timed_steps": timed_steps, "log_every": cfg.train.log_every, "ema": cfg.train.ema_decay > 0}
    return {"ms_train_loop": row}, {"runtime_num_threads": threads}, rss_after_imports


def kernels_used():
    """Which ops the models and the training step run: ms_ddpm's CPU kernels (MS_DDPM_KERNELS=0 turns them off) or
    MindSpore's."""
    from ms_ddpm.kernels import cpu_library

    library = cpu_library()
    if library is None:
        return "MindSpore's native ops only"
    return (f"ms_ddpm CPU kernels ({library.path.name}): GroupNorm"
            + (", convolutions" if library.convolutions else "; MindSpore's convolutions")
            + "; the step's gradient norm, clipping, EMA and Adam (not AdamW) over all weights at once; its draws of t "
              "and noise")


def count_flops_mindspore(cfg):
    """Forward FLOPs of one image (2 x MACs of convolutions, dense layers and attention matmuls), counted with
    forward hooks in PyNative mode; the attention matmuls are read off the U-Net's Attention / LinearAttention."""
    import mindspore as ms
    from mindspore import nn

    from ms_ddpm.models import unet
    from ms_ddpm.models import create_model

    net = create_model(cfg.model.name, **cfg.model.kwargs)
    net.set_train(False)
    counts = []

    def conv(cell, args, out):
        kh, kw = cell.kernel_size
        counts.append(2 * out.size * (cell.in_channels // cell.group) * kh * kw)

    def dense(cell, args, out):
        counts.append(2 * out.size * cell.in_channels)

    def attention(cell, args, out):
        b, _, h, w = args[0].shape
        n, d = h * w, cell.to_qkv.out_channels // (3 * cell.heads)
        # q^T k and attn v: two (n x d) by (d x n)-sized products per head
        counts.append(2 * 2 * b * cell.heads * n * n * d)

    def linear_attention(cell, args, out):
        b, _, h, w = args[0].shape
        n, d = h * w, cell.to_qkv.out_channels // (3 * cell.heads)
        # k v^T (d x n by n x d) and context^T q (d x d by d x n) per head
        counts.append(2 * 2 * b * cell.heads * d * d * n)

    for cell in net.cells_and_names():
        cell = cell[1]
        if isinstance(cell, nn.Conv2d):
            cell.register_forward_hook(conv)
        elif isinstance(cell, nn.Dense):
            cell.register_forward_hook(dense)
        elif isinstance(cell, unet.Attention):
            cell.register_forward_hook(attention)
        elif isinstance(cell, unet.LinearAttention):
            cell.register_forward_hook(linear_attention)
    shape = (1,) + image_shape(cfg)[1:]
    net(ms.Tensor(np.zeros(shape, np.float32)), ms.Tensor(np.zeros(1, np.int32)))
    return int(sum(counts))


def phase_ms_sample(args):
    """Sampling steps in GRAPH_MODE: DDPM, DDIM-50 and DPM-Solver-20 when the library has it."""
    import mindspore as ms

    from ms_ddpm.samplers import SAMPLERS, create_sampler
    from ms_ddpm.models import create_model
    from ms_ddpm.processes import create_process
    from ms_ddpm.runtime import set_runtime

    cfg = load_config(args)
    rss_after_imports = rss_mib()
    cfg.train.mode = "graph"
    threads = set_mindspore_threads(args)
    set_runtime(cfg.train)
    ms.set_seed(cfg.train.seed)
    diffusion = create_process(cfg.diffusion)
    net = create_model(cfg.model.name, **cfg.model.kwargs)
    net.set_train(False)
    shape = image_shape(cfg)
    T = diffusion.num_timesteps
    ddpm_steps = args.ddpm_steps or T
    plan = [("ms_sample_ddpm", "ddpm", ddpm_steps), ("ms_sample_ddim", "ddim", DDIM_STEPS)]
    out = {}
    if "dpm_solver" in SAMPLERS:
        plan.append(("ms_sample_dpm_solver", "dpm_solver", DPM_SOLVER_STEPS))
    else:
        out["ms_sample_dpm_solver"] = {"skipped": "ms_ddpm.samplers.SAMPLERS has no 'dpm_solver' yet"}
    network_s = time_network(args, net, shape, T)
    compiled = False
    for key, name, steps in plan:
        try:
            sampler = create_sampler(name, diffusion)
            sampler.set_timesteps(steps)
        except Exception as err:  # a sampler whose interface differs is reported, not fatal
            out[key] = {"skipped": f"could not build sampler {name!r}: {type(err).__name__}: {err}"}
            continue
        progress(f"MindSpore sampling, {name}, {steps} steps, batch {shape[0]}")
        out[key] = time_sampler(args, sampler, net, shape, steps)
        # what a step costs beyond its network call: the update's ops (or, fused, nothing but the launch) and the
        # host-side draws and timestep bookkeeping
        out[key]["network_ms"] = network_s * 1e3
        out[key]["overhead_ms_per_step"] = (out[key]["seconds_per_step"] - network_s) * 1e3
        out[key]["fused_step"] = sampler._fused_step(net) is not None
        if compiled:  # the samplers share the network, compiled during the first sampler's warm-up
            out[key]["compile_s"] = None
        compiled = compiled or bool(args.warmup)
    return out, {"runtime_num_threads": threads, "ddpm_steps": ddpm_steps}, rss_after_imports


def time_network(args, net, shape, T):
    """Median seconds of the compiled network call alone at the sampling batch (the floor of a sampling step)."""
    import mindspore as ms

    x = ms.Tensor(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    t = ms.Tensor(np.full((shape[0],), T // 2, np.int32))

    def calls(n):
        for _ in range(n):
            y = net(x, t)
        y.asnumpy()

    return measure(args, lambda i: calls(1), lambda: calls(args.steps_per_repeat), args.steps_per_repeat)[1]


def time_sampler(args, sampler, net, shape, steps):
    """Seconds per step of `sampler.sample_progressive` (the library's loop), timed over a prefix of a chain."""
    seeds = iter(range(1_000_000))
    timed = min(args.steps_per_repeat, steps)

    def chain_prefix(n):
        gen = sampler.sample_progressive(net, shape, seed=next(seeds), progress=False)
        for _ in range(n):
            out = next(gen)
        out.prev_sample.asnumpy()  # waits for the queued ops
        gen.close()

    # each warm-up call is the first step of a fresh chain; the first one compiles the network
    measured = measure(args, lambda i: chain_prefix(1), lambda: chain_prefix(timed), timed)
    return result(measured, shape[0], steps, steps=steps, steps_timed_per_repeat=timed, extrapolated=timed < steps)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch phases


def load_torch_unet():
    """The PyTorch port of the U-Net, `tests/torch_unet.py` (test-only, so outside the package), loaded by path."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "torch_unet.py")
    spec = importlib.util.spec_from_file_location("torch_unet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_setup(args):
    import torch

    TorchUnet = load_torch_unet().Unet
    cfg = load_config(args)
    if cfg.model.name != "unet":
        raise SystemExit(f"no PyTorch reference for model {cfg.model.name!r} (only 'unet')")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.train.seed)
    return cfg, torch, TorchUnet(**cfg.model.kwargs)


def diffusion_tables(cfg, torch):
    from ms_ddpm.losses import timestep_weights
    from ms_ddpm.processes import create_process

    d = create_process(cfg.diffusion)
    ab = d.alphas_cumprod
    weights = None
    if cfg.diffusion.loss_weighting != "none":
        w = timestep_weights(d, cfg.diffusion.loss_weighting, cfg.diffusion.p2_gamma, cfg.diffusion.p2_k,
                             cfg.diffusion.min_snr_gamma)
        weights = torch.tensor(w, dtype=torch.float32)
    sqrt_ab = torch.tensor(np.sqrt(ab), dtype=torch.float32)
    return d, sqrt_ab, torch.tensor(np.sqrt(1 - ab), dtype=torch.float32), weights


def phase_torch_train(args):
    """The PyTorch U-Net trained eagerly with the config's optimizer, loss, gradient clipping and EMA."""
    diffusion_loss = load_torch_unet().diffusion_loss

    cfg, torch, model = torch_setup(args)
    rss_after_imports = rss_mib()
    d, sqrt_ab, sqrt_1m_ab, weights = diffusion_tables(cfg, torch)
    t_cfg = cfg.train
    if t_cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=t_cfg.lr, eps=1e-8)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=t_cfg.lr, eps=1e-8, weight_decay=t_cfg.weight_decay)
    model.train()
    rng = np.random.default_rng(t_cfg.seed)
    shape = image_shape(cfg)
    images = torch.from_numpy(rng.uniform(-1, 1, shape).astype(np.float32))
    T = d.num_timesteps
    losses = []
    params = list(model.parameters())
    ema = [p.detach().clone() for p in params] if t_cfg.ema_decay > 0 else None
    ema_updates = 0

    def step():
        nonlocal ema_updates
        t = torch.from_numpy(rng.integers(0, T, shape[0]))
        noise = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
        loss = diffusion_loss(model, images, t, noise, sqrt_ab, sqrt_1m_ab, cfg.diffusion.objective,
                              cfg.diffusion.loss_type, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t_cfg.grad_clip)
        opt.step()
        if ema is not None:  # the decay rule of train/ema.py, one fused update over all weights
            n = ema_updates
            decay = min(t_cfg.ema_decay, (1 + n) / (10 + n)) if t_cfg.ema_warmup else t_cfg.ema_decay
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1 - decay)
            ema_updates += 1
        losses.append(loss.item())

    progress(f"PyTorch training, eager, batch {shape[0]}")
    measured = measure(args, lambda i: step(), lambda: [step() for _ in range(args.steps_per_repeat)],
                       args.steps_per_repeat)
    out = {"torch_train": result(measured, shape[0], loss_finite=bool(np.isfinite(losses).all()),
                                 optimizer=t_cfg.optimizer, loss_type=cfg.diffusion.loss_type)}
    return out, {"torch_threads": torch.get_num_threads(), "flops_per_image_forward_torch": count_flops_torch(cfg,
                 torch, model)}, rss_after_imports


def count_flops_torch(cfg, torch, model):
    """Forward FLOPs of one image according to torch.utils.flop_counter (convolutions, linear layers, matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = (1,) + image_shape(cfg)[1:]
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(shape), torch.zeros(1, dtype=torch.long))
    return int(counter.get_total_flops())


def torch_ddim(model, x, steps, timesteps, alphas_cumprod, objective, clip):
    """Deterministic DDIM (eta 0, Song et al. Eq. 12) in PyTorch over `steps`, a prefix of the descending
    `timesteps`, with ms_ddpm's conventions: x0_hat clipped to [-1, 1] when `clip`, eps_hat the network's own."""
    import torch

    from ms_ddpm.processes import predict_eps, predict_x0, vp_alpha_sigma  # the library's conversions, on torch tensors here

    with torch.inference_mode():
        for i, t in enumerate(steps):
            a_t = float(alphas_cumprod[t])
            a_prev = float(alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
            out = model(x, torch.full((x.shape[0],), int(t), dtype=torch.long))
            alpha, sigma = vp_alpha_sigma(a_t)
            x0, eps = predict_x0(objective, out, x, alpha, sigma), predict_eps(objective, out, x, alpha, sigma)
            if clip:
                x0 = x0.clamp(-1, 1)
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x


def phase_torch_sample(args):
    """DDIM-50 (eta 0, the library's timesteps and x0 clipping) with the PyTorch U-Net, eager, no autograd."""
    from ms_ddpm.samplers import spaced_timesteps

    cfg, torch, model = torch_setup(args)
    rss_after_imports = rss_mib()
    d = diffusion_tables(cfg, torch)[0]
    model.eval()
    shape = image_shape(cfg)
    timesteps = spaced_timesteps(d.num_timesteps, DDIM_STEPS, "leading")  # DDIMSampler's default spacing

    def chain_prefix(n, seed):
        x = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))
        return torch_ddim(model, x, timesteps[:n], timesteps, d.alphas_cumprod, cfg.diffusion.objective,
                          d.clip_denoised)

    progress(f"PyTorch sampling, DDIM-{DDIM_STEPS}, eager, batch {shape[0]}")
    timed = min(args.steps_per_repeat, DDIM_STEPS)
    seeds = iter(range(1_000_000))
    measured = measure(args, lambda i: chain_prefix(1, next(seeds)), lambda: chain_prefix(timed, next(seeds)), timed)
    out = {"torch_sample_ddim": result(measured, shape[0], DDIM_STEPS, steps=DDIM_STEPS, steps_timed_per_repeat=timed,
                                       extrapolated=timed < DDIM_STEPS)}
    return out, {"torch_threads": torch.get_num_threads()}, rss_after_imports


PHASES = {
    "ms_train_graph": lambda args: phase_ms_train(args, "graph"),
    "ms_train_loop": phase_ms_train_loop,
    "ms_train_pynative": lambda args: phase_ms_train(args, "pynative"),
    "ms_sample": phase_ms_sample,
    "torch_train": phase_torch_train,
    "torch_sample": phase_torch_sample,
}


def run_phase_here(args):
    if args.phase.startswith("torch"):
        # torch before ms_ddpm, which imports MindSpore: MindSpore loads the system libgomp, and torch imported after
        # it runs on that instead of its own bundled OpenMP runtime; the yardstick should be torch as users run it
        import torch  # noqa: F401
    rows, extra, rss_after_imports = PHASES[args.phase](args)
    peak = peak_rss_mib()
    for row in rows.values():
        if "skipped" not in row:
            row["peak_rss_mib"] = peak
            row["rss_after_imports_mib"] = rss_after_imports
    with open(args.phase_out, "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "extra": extra}, f)


# ---------------------------------------------------------------------------------------------------------------
# the parent: machine description, matmul throughput, phases in subprocesses, report


def matmul_gflops(torch=None, n=MATMUL_SIZE, repeats=5):
    """Best float32 GFLOP/s of an n x n matmul (2 n^3 FLOPs) with NumPy, and with torch when given."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = {}
    fns = {"numpy": lambda: a @ b}
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        fns["torch"] = lambda: ta @ tb
    for name, fn in fns.items():
        fn()
        best = min(_time_once(fn) for _ in range(repeats))
        out[name] = 2 * n**3 / best / 1e9
    return out


def _time_once(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run_phase_subprocess(argv, phase, workdir):
    out = os.path.join(workdir, phase + ".json")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--phase", phase, "--phase-out", out]
    env = dict(os.environ)
    env.setdefault("GLOG_v", "3")  # MindSpore: errors only, so that progress lines stay readable
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0:
        return None, f"phase {phase} failed with exit code {proc.returncode} (its error is printed above)"
    with open(out, encoding="utf-8") as f:
        data = json.load(f)
    data["wall_s"] = time.perf_counter() - start
    return data, None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.phase is not None:
        return run_phase_here(args)
    from ms_ddpm.config import ConfigError  # imports no MindSpore, as ms_ddpm.utils

    try:
        cfg = load_config(args)  # with --set, as every phase loads it
    except ConfigError as err:
        sys.exit(f"benchmark: error: {err}")
    if cfg.diffusion.process != "ddpm":
        sys.exit("benchmark: error: the sampling rows and the PyTorch yardstick are DDPM's; give a config with "
                 "diffusion.process ddpm")
    started = time.perf_counter()
    command = "python " + shlex.join(["scripts/benchmark.py", *argv])
    machine = machine_description()
    use_torch = not args.skip_torch and torch_available()
    notes = []
    if args.skip_torch:
        notes.append("PyTorch rows skipped (--skip-torch)")
    elif not use_torch:
        notes.append("PyTorch rows skipped: torch is not installed (pip install -e '.[dev]')")
    if cfg.model.name != "unet":
        notes.append("FLOPs: attention matmuls are counted for the 'unet' model only")
        if use_torch:
            use_torch = False
            notes.append("PyTorch rows skipped: the PyTorch reference exists for model 'unet' only")

    progress("matmul throughput (float32, %dx%d)" % (MATMUL_SIZE, MATMUL_SIZE))
    torch_mod = None
    if use_torch:
        import torch as torch_mod
    matmul = matmul_gflops(torch_mod)
    del torch_mod

    phases = ["ms_train_graph", "ms_train_loop", "ms_train_pynative", "ms_sample"]
    if use_torch:
        phases += ["torch_train", "torch_sample"]
    if args.phases:
        phases = [p for p in phases if p in args.phases]
    rows, extra, failed = {}, {}, False
    with tempfile.TemporaryDirectory() as workdir:
        for i, phase in enumerate(phases, 1):
            progress(f"phase {i}/{len(phases)}: {phase}")
            data, error = run_phase_subprocess(argv, phase, workdir)
            if error:
                notes.append(error)
                failed = True
                continue
            rows.update(data["rows"])
            extra.update(data["extra"])
            extra[phase + "_wall_s"] = round(data["wall_s"], 1)
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    settings = {"config": args.config, "batch_size": args.batch_size, "repeats": args.repeats, "warmup": args.warmup,
                "steps_per_repeat": args.steps_per_repeat, "threads": args.threads, "ddim_steps": DDIM_STEPS,
                "dpm_solver_steps": DPM_SOLVER_STEPS, "matmul_size": MATMUL_SIZE}
    report = build_report(settings, command, machine, matmul, rows, extra, notes)
    report["total_wall_s"] = time.perf_counter() - started
    print_report(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
