"""FD and samples/s of one checkpoint under every diffusion sampler at several step counts: the README's table.

    python scripts/sampler_table.py --ckpt outputs/mnist5k/ckpt_00001300.ckpt \
        --features outputs/classifier.ckpt --num 500 --json outputs/sampler_table.json

Each row is one `ms_ddpm.metrics.evaluate.evaluate` call (the same code as `ms-ddpm evaluate`), with the same seeds
for every sampler; the first row is the real-vs-real floor (`real_floor`: `--num` real train images against the
test split) for scale. Rows are written to the JSON file as they finish, so an interrupted run keeps its rows and
`--json` of a previous run is extended, not overwritten: rows already there are skipped.
Read the table against Table 1 of the DDIM paper (Song et al. 2021): DDIM degrades gently as steps fall, DDPM's
ancestral sampler collapses.
"""
import argparse
import json
import os
import sys

from ms_ddpm.metrics.evaluate import evaluate, real_floor
from ms_ddpm.samplers import DIFFUSION_SAMPLERS

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
    p.add_argument("--json", required=True, help="rows are appended here as they finish (JSON lines)")
    args = p.parse_args(argv)
    caps = {}
    for item in args.max_steps:
        name, _, value = item.partition("=")
        if name not in DIFFUSION_SAMPLERS or not value.isdigit():
            p.error(f"--max-steps takes SAMPLER=STEPS with SAMPLER in {list(DIFFUSION_SAMPLERS)}, got {item!r}")
        caps[name] = int(value)
    args.max_steps = caps
    return args


def load_rows(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def row_key(row):
    return ("floor", 0) if row.get("real_floor") else (row["sampler"], row["steps"])


def markdown(rows):
    """The rows as a Markdown table: one line per sampler, FD and samples/s per step count."""
    floor = next((r for r in rows if r.get("real_floor")), None)
    steps = sorted({r["steps"] for r in rows if not r.get("real_floor")})
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
    plan = [("floor", 0)] + [(name, s) for s in sorted(args.steps) for name in args.samplers
                             if s <= args.max_steps.get(name, s)]
    for name, steps in plan:
        if (name, steps) in done:
            continue
        print(f"[sampler_table] {name} {steps or ''}", file=sys.stderr, flush=True)
        if name == "floor":
            row = real_floor(args.ckpt, **common)
        else:
            row = evaluate(args.ckpt, name, steps=steps, progress=False, **common)
        row["load_average"] = os.getloadavg()  # samples/s is only as good as the machine was quiet
        rows.append(row)
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
