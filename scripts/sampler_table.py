"""FD and samples/s of one checkpoint under every diffusion sampler at several step counts, and for a
class-conditional checkpoint FD and class accuracy over classifier-free guidance scales: the README's tables.

    python scripts/sampler_table.py --ckpt outputs/mnist5k/ckpt_00000800.ckpt \
        --features outputs/classifier.ckpt --num 500 --json outputs/sampler_table.json
    python scripts/sampler_table.py --ckpt outputs/mnist5k_cond/ckpt_00001200.ckpt \
        --features outputs/classifier.ckpt --num 1000 --runs ddim=50 dpm_solver=20 \
        --guidance-scales 1 1.5 2 3 5 --json outputs/guidance_table.json

Each row is one `ms_ddpm.metrics.evaluate.evaluate` call (the same code as `ms-ddpm evaluate`), with the same seeds
for every sampler; the first row is the real-vs-real floor (`real_floor`: `--num` real train images against the
test split) for scale. Rows are written to the JSON file as they finish, so an interrupted run keeps its rows and
`--json` of a previous run is extended, not overwritten: rows already there are skipped.
Read the sampler table against Table 1 of the DDIM paper (Song et al. 2021): DDIM degrades gently as steps fall,
DDPM's ancestral sampler collapses; the guidance table against Ho & Salimans 2021 (Tables 1-2: as guidance grows,
fidelity rises and diversity falls, so FD first improves and then worsens; their w is guidance_scale - 1).
"""
import argparse
import json
import os
import sys

from ms_ddpm.metrics.evaluate import evaluate, real_floor
from ms_ddpm.samplers import samplers_for

DIFFUSION_SAMPLERS = samplers_for("ddpm")

STEPS = (10, 20, 50, 100, 1000)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by `ms-ddpm train`")
    p.add_argument("--features", default=None, help="classifier checkpoint of scripts/train_classifier.py")
    p.add_argument("--num", type=int, default=1000, help="samples per row (and real images of the floor)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--samplers", nargs="+", default=list(DIFFUSION_SAMPLERS), choices=list(DIFFUSION_SAMPLERS))
    p.add_argument("--steps", nargs="+", type=int, default=list(STEPS), help="step counts of every sampler")
    p.add_argument("--max-steps", nargs="+", default=[], metavar="SAMPLER=STEPS",
                   help="cap a sampler's step counts, e.g. pc=100 (its longer rows are left out)")
    p.add_argument("--runs", nargs="+", default=None, metavar="SAMPLER=STEPS",
                   help="exactly these sampler / step-count pairs, e.g. ddim=50 dpm_solver=20, instead of "
                   "--samplers x --steps")
    p.add_argument("--guidance-scales", nargs="+", type=float, default=[1.0], metavar="W",
                   help="classifier-free guidance scales of a class-conditional checkpoint (every run at each)")
    p.add_argument("--json", required=True, help="rows are appended here as they finish (JSON lines)")
    args = p.parse_args(argv)

    def pairs(items, option):
        out = []
        for item in items:
            name, _, value = item.partition("=")
            if name not in DIFFUSION_SAMPLERS or not value.isdigit():
                p.error(f"{option} takes SAMPLER=STEPS with SAMPLER in {list(DIFFUSION_SAMPLERS)}, got {item!r}")
            out.append((name, int(value)))
        return out

    args.max_steps = dict(pairs(args.max_steps, "--max-steps"))
    args.runs = None if args.runs is None else pairs(args.runs, "--runs")
    return args


def load_rows(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def row_key(row):
    return ("floor", 0, 1.0) if row.get("real_floor") else (row["sampler"], row["steps"],
                                                            row.get("guidance_scale", 1.0))


def guidance_markdown(rows):
    """Rows over guidance scales as a Markdown table: one line per scale, FD and class accuracy per run."""
    runs = sorted({(r["sampler"], r["steps"]) for r in rows}, key=lambda run: (DIFFUSION_SAMPLERS.index(run[0]), run[1]))
    cells = {row_key(r): r for r in rows}
    lines = ["| guidance scale | " + " | ".join(f"{name}-{steps} FD | {name}-{steps} class accuracy"
                                                for name, steps in runs) + " |",
             "|---:|" + "---:|---:|" * len(runs)]
    for w in sorted({r.get("guidance_scale", 1.0) for r in rows}):
        row = []
        for name, steps in runs:
            r = cells.get((name, steps, w))
            accuracy = "-" if r is None or r.get("class_accuracy") is None else f"{r['class_accuracy']:.3f}"
            row += ["-" if r is None else f"{r['fd']:.2f}", accuracy]
        lines.append(f"| {w:g} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown(rows):
    """The rows as a Markdown table: one line per sampler, FD and samples/s per step count (with several guidance
    scales: `guidance_markdown`)."""
    floor = next((r for r in rows if r.get("real_floor")), None)
    sampled = [r for r in rows if not r.get("real_floor")]
    if len({r.get("guidance_scale", 1.0) for r in sampled}) > 1:
        table = guidance_markdown(sampled)
        if floor:
            table += (f"\n\nreal-vs-real floor ({floor['num']} train vs {floor['num_real']} test images): "
                      f"FD {floor['fd']:.3f}")
        return table
    steps = sorted({r["steps"] for r in sampled})
    lines = ["| sampler | " + " | ".join(f"{s} steps" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for name in DIFFUSION_SAMPLERS:
        cells = {r["steps"]: r for r in rows if r.get("sampler") == name}
        if cells:
            row = [f"{cells[s]['fd']:.2f} ({cells[s]['samples_per_s']:.1f}/s)" if s in cells else "-" for s in steps]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
    if floor:
        lines.append(f"\nreal-vs-real floor ({floor['num']} train vs {floor['num_real']} test images): "
                     f"FD {floor['fd']:.3f}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    rows = load_rows(args.json)
    if any(r["num"] != args.num for r in rows):
        sys.exit(f"sampler_table: error: {args.json} holds rows of another --num; FDs compare only at equal num")
    done = {row_key(r) for r in rows}
    common = dict(num=args.num, batch_size=args.batch_size, feature_ckpt=args.features)
    # short chains first: a run stopped early still has a complete table of them
    runs = args.runs or [(name, s) for s in sorted(args.steps) for name in args.samplers
                         if s <= args.max_steps.get(name, s)]
    plan = [("floor", 0, 1.0)] + [(name, s, w) for w in args.guidance_scales for name, s in runs]
    for name, steps, w in plan:
        if (name, steps, w) in done:
            continue
        print(f"[sampler_table] {name} {steps or ''}" + (f" guidance {w:g}" if w != 1 else ""), file=sys.stderr,
              flush=True)
        if name == "floor":
            row = real_floor(args.ckpt, **common)
        else:
            row = evaluate(args.ckpt, name, steps=steps, progress=False, guidance_scale=w, **common)
        row["load_average"] = os.getloadavg()  # samples/s is only as good as the machine was quiet
        rows.append(row)
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
