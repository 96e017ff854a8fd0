"""How `scripts/benchmark.py` reports what it measured: the table, the headline figures, the notes, the JSON.

`build_report` turns the phases' rows (one dict per measured row, see benchmark.py) into the report dict that is
printed by `print_report` and written as JSON; nothing here measures anything.
"""

# rows of the report: (key, what, the PyTorch row it is compared with)
ROWS = [
    ("ms_train_graph", "train, MindSpore GRAPH_MODE (jit TrainStep)", "torch_train"),
    ("ms_train_loop", "train, the trainer's loop on data (GRAPH_MODE)", "torch_train"),
    ("ms_train_pynative", "train, MindSpore PYNATIVE_MODE", "torch_train"),
    ("torch_train", "train, PyTorch eager", None),
    ("ms_sample_ddpm", "sample DDPM-{ddpm_steps}, MindSpore GRAPH_MODE", None),
    ("ms_sample_ddim", "sample DDIM-{ddim_steps}, MindSpore GRAPH_MODE", "torch_sample_ddim"),
    ("ms_sample_dpm_solver", "sample DPM-Solver-{dpm_solver_steps}, MindSpore GRAPH_MODE", None),
    ("torch_sample_ddim", "sample DDIM-{ddim_steps}, PyTorch eager", None),
]


def build_report(settings, command, machine, matmul, rows, extra, notes):
    """The report dict. settings: the run's options (config, batch_size, repeats, warmup, steps_per_repeat,
    threads, ddim_steps, dpm_solver_steps, matmul_size); rows: {key: row} from the phases; extra: the phases'
    other figures; notes: lines to print (extended here)."""
    flops = extra.get("flops_per_image_forward")
    flops_torch = extra.get("flops_per_image_forward_torch")
    if flops and flops_torch and flops != flops_torch:
        notes.append(f"FLOP counts differ: MindSpore hooks {flops}, torch FlopCounterMode {flops_torch}")
    peak = max(matmul.values())
    settings = dict(settings, ddpm_steps=extra.get("ddpm_steps"))
    table = []
    for key, what, torch_key in ROWS:
        if key not in rows:
            continue
        row = dict(rows[key], key=key, what=what.format(**settings))
        if "skipped" not in row:
            if torch_key and torch_key in rows and "img_per_s" in rows[torch_key]:
                row["ratio_vs_pytorch"] = row["img_per_s"] / rows[torch_key]["img_per_s"]
            if flops:
                per_image = flops * (3 if "train" in key else 1)
                row["gflops_per_s"] = row["img_per_s"] * per_image / 1e9
                row["fraction_of_matmul_peak"] = row["gflops_per_s"] / peak
        table.append(row)
    starved = [r["key"] for r in table if r.get("cpu_seconds_per_second", 2**31) < 0.75 * machine["usable_cpus"]]
    if starved:
        notes.insert(0, f"WARNING: {', '.join(starved)} used less than 75% of the {machine['usable_cpus']} usable "
                        "CPUs while timed (CPU s/s column): other work was probably competing for the cores, and "
                        "those figures understate the speed (OpenMP-threaded PyTorch suffers most); re-run on an idle "
                        "machine")
    if any(r.get("extrapolated") for r in table):
        notes.append("sampling img/s = batch / (median seconds per step x steps): each repeat timed the first "
                     f"{settings['steps_per_repeat']} steps of a fresh chain, extrapolated to the full step count")
    notes.append("training step = the library's TrainStep with the config's optimizer, loss scaler, gradient "
                 "clipping and EMA, drawing t and noise itself, on random images; the loss read back once per repeat")
    if "ms_train_loop" in rows and "host_ms_per_step" in rows["ms_train_loop"]:
        notes.append("trainer's loop = Trainer.train on the config's data, no checkpoints, grids or evaluations; "
                     "host ms/step = its wall time per step minus the step calls (each synchronized) and the waits "
                     "for data: the loop's own work per step, averaged over logging and other steps")
    notes.append("PyTorch training: same U-Net, batch, optimizer, loss, gradient clipping and EMA, float32, no loss scaler")
    notes.append("peak RSS: ru_maxrss of the phase's own process: interpreter, framework, model, compilation, loop "
                 "(the RSS right after imports is in the JSON as rss_after_imports_mib)")
    notes.append("compile s: the first call minus a steady step: graph compilation in GRAPH_MODE (the samplers share "
                 "one compiled network, so only the first sampler row shows it), one-off set-up costs elsewhere; the "
                 "headline's first step is the whole first call")
    notes.append("CPU s/s: CPU seconds the phase used per wall second while timed; well below the thread count "
                 "means other work on the machine competed for the cores")
    notes.append("FLOPs: 2 x MACs of convs, dense layers and attention matmuls (norms, activations, softmax not "
                 "counted); a training step is taken as 3 x forward")
    return {
        "command": command,
        "machine": machine,
        "settings": settings,
        "headline": headline(rows),
        "extra": extra,
        "matmul_gflops_per_s": matmul,
        "flops_per_image_forward": flops,
        "rows": table,
        "notes": notes,
    }


def headline(rows):
    """What the project's performance targets are stated in (README, docs/performance.md): MindSpore / PyTorch for
    graph training and DDIM sampling, and the graph-training process's first step and peak RSS."""
    out = {}
    for key in ("ms_train_graph", "ms_sample_ddim"):
        torch_key = dict((k, t) for k, _, t in ROWS)[key]
        if "img_per_s" in rows.get(key, {}) and "img_per_s" in rows.get(torch_key, {}):
            out[key + "_vs_pytorch"] = rows[key]["img_per_s"] / rows[torch_key]["img_per_s"]
    train = rows.get("ms_train_graph", {})
    if "img_per_s" in train:
        out["train_graph_first_step_s"] = train["first_call_s"]
        out["train_graph_peak_rss_mib"] = train["peak_rss_mib"]
    return out


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_report(r):
    m, e = r["machine"], r["extra"]
    print()
    print("command: " + r["command"])
    print(f"machine: {m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs, "
          f"{m['memory_gib']} GiB, {m['platform']}")
    print(f"versions: python {m['python']}, mindspore {m['mindspore']}, torch {m['torch'] or '-'}, numpy {m['numpy']}")
    print(f"MindSpore ops: {e.get('kernels', '-')}")
    print(f"threads: MindSpore runtime_num_threads {e.get('runtime_num_threads', '-')}, "
          f"torch {e.get('torch_threads', '-')}; load average at start {m['load_average_at_start']}, "
          f"at end {m['load_average_at_end']}")
    s = r["settings"]
    batch = s["batch_size"] if s["batch_size"] is not None else "config's"
    print(f"settings: batch {batch}, warmup {s['warmup']}, repeats {s['repeats']} x {s['steps_per_repeat']} steps "
          f"(median), parameters {e.get('parameters', '-')}")
    flops, flops_torch = r["flops_per_image_forward"], e.get("flops_per_image_forward_torch")
    matmul = ", ".join(f"{k} {v:.1f}" for k, v in r["matmul_gflops_per_s"].items())
    print(f"forward FLOPs per image: {_fmt(flops and flops / 1e6, '.2f')} M by MindSpore hooks, "
          f"{_fmt(flops_torch and flops_torch / 1e6, '.2f')} M by torch FlopCounterMode; "
          f"float32 {s['matmul_size']}x{s['matmul_size']} matmul GFLOP/s: {matmul}")
    print()
    header = (f"{'what':<48} {'img/s':>9} {'vs PyTorch':>10} {'ms/step':>9} {'compile s':>9} {'GFLOP/s':>8} "
              f"{'% matmul':>8} {'peak RSS MiB':>12} {'CPU s/s':>7}")
    print(header)
    print("-" * len(header))
    for row in r["rows"]:
        if "skipped" in row:
            print(f"{row['what']:<48} skipped: {row['skipped']}")
            continue
        ratio = row.get("ratio_vs_pytorch")
        frac = row.get("fraction_of_matmul_peak")
        print(f"{row['what']:<48} {row['img_per_s']:>9.2f} {_fmt(ratio, '.2f'):>10} "
              f"{row['seconds_per_step'] * 1e3:>9.1f} {_fmt(row['compile_s'], '.1f'):>9} "
              f"{_fmt(row.get('gflops_per_s'), '.2f'):>8} {_fmt(frac and 100 * frac, '.1f'):>8} "
              f"{row['peak_rss_mib']:>12.0f} {row['cpu_seconds_per_second']:>7.2f}")
    overhead = [f"{row['what'].split(',')[0].replace('sample ', '')} {row['overhead_ms_per_step']:.1f} ms"
                + (" (fused step)" if row["fused_step"] else "")
                for row in r["rows"] if "overhead_ms_per_step" in row]
    if overhead:
        network_ms = next(row["network_ms"] for row in r["rows"] if "network_ms" in row)
        print(f"\nper-step overhead beyond the network call ({network_ms:.1f} ms alone): " + ", ".join(overhead))
    loop = next((row for row in r["rows"] if row["key"] == "ms_train_loop" and "host_ms_per_step" in row), None)
    if loop:
        print(f"\ntrainer's loop per step: {loop['seconds_per_step'] * 1e3:.1f} ms = step calls "
              f"{loop['step_call_ms_per_step']:.1f} ms + waiting for data {loop['data_ms_per_step']:.1f} ms + host "
              f"{loop['host_ms_per_step']:.2f} ms (over {loop['timed_steps']} steps, logging every "
              f"{loop['log_every']})")
    h = r["headline"]
    if h:
        print(f"\nheadline: graph training {_fmt(h.get('ms_train_graph_vs_pytorch'), '.2f')}x PyTorch, DDIM-"
              f"{s['ddim_steps']} {_fmt(h.get('ms_sample_ddim_vs_pytorch'), '.2f')}x; graph training's first step "
              f"{_fmt(h.get('train_graph_first_step_s'), '.1f')} s, peak RSS {_fmt(h.get('train_graph_peak_rss_mib'), '.0f')} MiB")
    print()
    for note in r["notes"]:
        print("note: " + note)
    print(f"total wall time {r['total_wall_s']:.0f} s")
