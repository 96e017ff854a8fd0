"""Every command that README.md, docs/*.md and the header comments of configs/*.yaml and scripts/*.sh show runs as shown.

The commands are discovered, not listed: each line of a ```bash block (continuation lines joined), each command line
of a header comment, and, for their options only, the commands quoted inline in the prose (`ms-ddpm ...`,
`python scripts/...`, `scripts/...`). A failure names the file and line of the command.

The default run (test_command_as_shown), for every command shown:
- its program's own argument parser takes the arguments as written (the program runs up to its argparse call; a
  launcher runs for real with msrun, or train.py, stood in, and the `ms-ddpm train` arguments it passes on are
  parsed in turn), a training command's config loads with its overrides as written, and every file it reads
  exists or is made by a command shown;
- then it runs as written, with only size overrides and PyNative mode appended (SIZE, tiny_train_overrides), in a
  copy of the repository's layout, and must exit with status 0. A file another command makes (the
  classifier) comes from running that command first; a checkpoint `<train.output_dir>/ckpt_<step>.ckpt`, or the run
  folder a `--resume` continues, from training that config with size overrides: each config is trained once (a
  run costs ten seconds or more), so other training commands of a config run with -m slow;
- or it is skipped, saying why: it needs the network (pip, wget) or files only such a command makes, is the test
  suite itself, needs Ascend devices, files the reader brings, or is long.
With `-m slow` (test_long_command_as_shown): the CPU training commands without overrides (the quick start) and the
CPU launches (on a free port) as written; the long scripts and the other training commands with size overrides.
"""
import argparse
import ast
import configparser
import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import yaml

from ms_ddpm import cli
from ms_ddpm.config import Config, ConfigError

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
HEADERS = [*sorted((REPO / "configs").glob("*.yaml")), *sorted((REPO / "scripts").glob("*.sh"))]
SHELL_FENCES = ("bash", "sh", "shell", "console")
OUTPUT_FLAGS = ("--out", "--output", "--json", "--log_dir")  # what follows is written, not read
FILE_SUFFIXES = (".ckpt", ".yaml", ".yml", ".json", ".pth", ".pt", ".bin", ".safetensors", ".npz", ".png")
OFFLINE = {"pip": "installs the project, which needs the package index (CI runs it: .ci/run)",
           "wget": "downloads published weights; the tests run offline"}
LAUNCHERS = ("scripts/run_distributed.sh", "scripts/run_distributed_ascend.sh")
# appended to a command in the default run; `ms-ddpm train` gets tiny_train_overrides. PyNative: a graph compile
# costs tens of seconds, two steps a fraction of one (graph mode is what the rest of the suite compiles)
SIZE = {"ms-ddpm sample": ["--num", "4", "--batch-size", "4", "--steps", "2", "--mode", "pynative"],
        "ms-ddpm evaluate": ["--num", "8", "--batch-size", "8", "--steps", "2", "--mode", "pynative"],
        "scripts/train_classifier.py": ["--epochs", "1", "--train-images", "64"]}
# too long for the default run even with size overrides: run with -m slow, with these appended
LONG = {"scripts/benchmark.py": ["--repeats", "1", "--warmup", "1", "--steps-per-repeat", "1", "--ddpm-steps", "2",
                                 "--batch-size", "2"],
        "scripts/sampler_table.py": ["--num", "8", "--batch-size", "8", "--steps", "2"],
        "scripts/background_speckle.py": ["--num", "4", "--batch-size", "4"]}


@dataclass(frozen=True)
class Command:
    where: str  # "README.md:17"
    argv: tuple
    inline: bool = False  # quoted in prose: its options are checked, it is not run

    def __str__(self):
        return shlex.join(self.argv)


# --- discovery -------------------------------------------------------------------------------------------------
def is_command(argv):
    head = argv[0] if argv else ""
    return (head == "ms-ddpm" or re.fullmatch(r"scripts/\S+\.(py|sh)", head) is not None
            or (head in ("python", "python3", "bash", "pip", "wget") and len(argv) > 1))


def doc_commands(path):
    """The commands of a Markdown file: fenced shell blocks line by line, and inline code spans in the prose."""
    rel, fence, pending, start = path.relative_to(REPO), None, "", 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        opening = re.match(r"\s*```(\w*)", line)
        if opening:
            fence = None if fence is not None else opening.group(1)
        elif fence in SHELL_FENCES:
            start = start if pending else n
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            argv, pending = shlex.split(pending + line, comments=True), ""
            if argv:
                yield Command(f"{rel}:{start}", tuple(argv))
        elif fence is None:
            for span in re.findall(r"`([^`]+)`", line):
                with contextlib.suppress(ValueError):
                    argv = shlex.split(span)
                    if is_command(argv) and "..." not in span:
                        yield Command(f"{rel}:{n}", tuple(argv), inline=True)


def header_commands(path):
    """Command lines in the comment block a config or script starts with."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.startswith("#"):
            break
        with contextlib.suppress(ValueError):  # prose with an apostrophe
            argv = shlex.split(line.lstrip("#!"), comments=True)
            if is_command(argv):
                yield Command(f"{path.relative_to(REPO)}:{n}", tuple(argv))


COMMANDS = [c for path in DOCS for c in doc_commands(path)] + [c for path in HEADERS for c in header_commands(path)]
FULL = [c for c in COMMANDS if not c.inline]


# --- programs and their parsers --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Program:
    name: str  # "ms-ddpm train", "scripts/benchmark.py", "pip", ...
    script: str  # the file run (None for ms-ddpm and the offline tools)
    args: tuple  # the arguments after the program


def program_of(cmd):
    argv = list(cmd.argv)
    if argv[0] == "ms-ddpm":
        return Program(f"ms-ddpm {argv[1]}" if len(argv) > 1 else "ms-ddpm", None, tuple(argv[1:]))
    if argv[0] in ("python", "python3") and argv[1:3] == ["-m", "pytest"]:
        return Program("pytest", None, tuple(argv[3:]))
    if argv[0] in OFFLINE:
        return Program(argv[0], None, tuple(argv[1:]))
    script = argv[1] if argv[0] in ("python", "python3", "bash") else argv[0]
    if not re.fullmatch(r"scripts/\S+\.(py|sh)", script):
        pytest.fail(f"{cmd.where}: `{cmd}`: this test has no check for {script!r}; teach it one")
    if not (REPO / script).is_file():
        pytest.fail(f"{cmd.where}: `{cmd}` runs {script}, which does not exist")
    return Program(script, script, tuple(argv[2:] if argv[0] != script else argv[1:]))


class _Parsed(Exception):
    def __init__(self, parser, namespace):
        super().__init__()
        self.parser, self.namespace = parser, namespace


def parse(cmd, prog, parse_args=True):
    """Run a Python program up to its argparse call and stop there: (parser, namespace or None).

    The parse error argparse prints fails the test with the command's place."""
    real = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        raise _Parsed(self, real(self, args, namespace) if parse_args else None)

    err = io.StringIO()
    script_dir = [] if prog.script is None else [str((REPO / prog.script).parent)]  # as `python script.py` has
    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop), \
            mock.patch.object(sys, "argv", [prog.script or "ms-ddpm", *prog.args]), \
            mock.patch.object(sys, "path", [*script_dir, *sys.path]), \
            contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if prog.script is None:
                cli.main(list(prog.args))
            else:
                runpy.run_path(str(REPO / prog.script), run_name="__main__")
        except _Parsed as parsed:
            return parsed.parser, parsed.namespace
        except SystemExit:
            pass
    pytest.fail(f"{cmd.where}: `{cmd}` does not parse:\n{err.getvalue()}")


def canonical(prog, namespace):
    """scripts/train.py and scripts/sample.py are `ms-ddpm train` and `ms-ddpm sample`."""
    command = getattr(namespace, "command", None)
    return f"ms-ddpm {command}" if command else prog.name


def check_train_config(cmd, namespace):
    try:
        return Config.load(namespace.config, namespace.set)
    except ConfigError as err:
        pytest.fail(f"{cmd.where}: `{cmd}`: ms-ddpm train would refuse its config: {err}")


# --- the files a command reads ---------------------------------------------------------------------------------
def path_tokens(argv):
    """(path, is_output) for the arguments that name files: with a '/' or a file suffix, not options or key=value."""
    for prev, token in zip(("",) + tuple(argv), argv):
        if (token.startswith("-") or "=" in token or "://" in token
                or not ("/" in token or token.endswith(FILE_SUFFIXES))):
            continue
        yield os.path.normpath(token), prev in OUTPUT_FLAGS


def outputs_of(cmd):
    if cmd.argv[0] == "wget":
        return [cmd.argv[-1].rsplit("/", 1)[-1]]
    return [p for p, is_output in path_tokens(cmd.argv) if is_output]


def config_output_dirs():
    """train.output_dir -> config file, of the shipped configs."""
    return {os.path.normpath(Config.load(p).train.output_dir): str(p.relative_to(REPO))
            for p in sorted((REPO / "configs").glob("*.yaml"))}


@dataclass(frozen=True)
class Source:
    """Where a file a command reads comes from."""
    path: str
    maker: Command = None  # the command that makes it
    config: str = None  # the config whose training run makes it (a checkpoint or a run folder to resume)
    brought: bool = False  # the reader brings it (a bare file name no command makes)


def in_checkout(path):
    """Whether `path` is in a fresh checkout: it exists here and git does not ignore it (a run's outputs/ of this
    working tree are not copied into the sandboxes)."""
    ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, capture_output=True).returncode == 0
    return (REPO / path).exists() and not ignored


def sources(cmd, prog, train_cfg=None):
    """Sources of the files cmd reads (the program itself aside); a file nothing provides fails the test."""
    out, made_by, ckpt_dirs = [], {}, config_output_dirs()
    for other in FULL:
        for path in outputs_of(other):
            made_by.setdefault(path, other)
    needed = [p for p, is_output in path_tokens(cmd.argv) if not is_output and p != prog.script]
    if train_cfg is not None and "--resume" in prog.args:
        needed.append(os.path.normpath(train_cfg.train.output_dir))  # the run to continue
    if train_cfg is not None and train_cfg.latent.autoencoder:  # a latent run reads its autoencoder's checkpoint
        needed.append(os.path.normpath(train_cfg.latent.autoencoder))
    for path in needed:
        run_dir = path if path in ckpt_dirs else os.path.dirname(path)
        if in_checkout(path):
            continue
        if path in made_by and made_by[path] != cmd:
            out.append(Source(path, maker=made_by[path]))
        elif run_dir in ckpt_dirs and (path == run_dir or re.fullmatch(r"ckpt_\d+\.ckpt", os.path.basename(path))):
            out.append(Source(path, config=ckpt_dirs[run_dir]))
        elif "/" not in path:
            out.append(Source(path, brought=True))
        else:
            pytest.fail(f"{cmd.where}: `{cmd}` reads {path}, which does not exist and which no command shown makes")
    return out


# --- running ---------------------------------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def before_separator(args, extra):
    """Launcher options go before the "--" that starts the `ms-ddpm train` arguments."""
    args = list(args)
    cut = args.index("--") if "--" in args else len(args)
    return args[:cut] + list(extra) + args[cut:]


def tiny_train_overrides(cfg):
    """A 2-step run of the config's data with a small U-Net, op by op (as SIZE): what the commands after it need,
    in seconds."""
    sets = ["train.steps=2", "train.warmup_steps=0", "train.batch_size=4", "train.log_every=1", "train.save_every=2",
            "train.sample_every=2", "train.num_samples=4", "train.sample_steps=2", "train.mode=pynative"]
    if cfg.model.name == "unet":
        tiny = dict(cfg.model.kwargs, dim=8, dim_mults=[1], heads=1, dim_head=8)  # one level: a shorter compile
        for levels in ("attention_levels", "cross_attention_levels"):
            if levels in tiny:
                tiny[levels] = [0]  # the one level left
        sets.append("model.kwargs=" + yaml.safe_dump(tiny, default_flow_style=True).strip())
    elif cfg.model.name == "autoencoder_kl":  # narrow, with the config's levels (its latents' size) and channels
        levels = len(cfg.model.kwargs["block_out_channels"])
        tiny = dict(cfg.model.kwargs, block_out_channels=[8] * levels, layers_per_block=1, norm_num_groups=4)
        sets.append("model.kwargs=" + yaml.safe_dump(tiny, default_flow_style=True).strip())
    return ["--set", *sets]


def tail(text, n=25):
    return "\n".join(text.splitlines()[-n:])


class Runner:
    """Runs commands in sandboxes laid out like the repository; each distinct run happens once per session."""

    def __init__(self, root):
        self.root, self.runs, self.count = root, {}, 0
        ignored = [p.strip() for p in (REPO / ".gitignore").read_text().splitlines()
                   if p.strip() and not p.startswith(("#", "!"))]
        self.entries = [p for p in REPO.iterdir() if not p.name.startswith(".")
                        and not any(Path(p.name).match(pattern.rstrip("/")) for pattern in ignored)]

    def sandbox(self, stand_in_train=None):
        """A fresh folder with the repository's files linked (nothing beside it: the commands read the digits the
        package carries); with stand_in_train, a scripts/ folder whose train.py is that code."""
        self.count += 1
        repo = self.root / f"run{self.count}" / "repo"
        repo.mkdir(parents=True)
        for entry in self.entries:
            if entry.name == "scripts" and stand_in_train:
                (repo / "scripts").mkdir()
                for script in entry.iterdir():
                    if script.name != "train.py":
                        (repo / "scripts" / script.name).symlink_to(script)
                (repo / "scripts" / "train.py").write_text(stand_in_train)
            else:
                (repo / entry.name).symlink_to(entry)
        return repo

    @staticmethod
    def env(*path_first):
        path = os.pathsep.join([*map(str, path_first), str(Path(sys.executable).parent), os.environ["PATH"]])
        return dict(os.environ, PATH=path, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))

    def run(self, cmd, argv, needs=(), timeout=900):
        """Run argv (cmd as written, plus size overrides) once; returns (sandbox, CompletedProcess)."""
        key = tuple(argv)
        if key not in self.runs:
            repo = self.sandbox()
            for source in needs:
                self.provide(cmd, source, repo)
            result = subprocess.run(list(argv), cwd=repo, env=self.env(), capture_output=True, text=True,
                                    timeout=timeout)
            self.runs[key] = repo, result
        return self.runs[key]

    def provide(self, cmd, source, repo):
        """Copy the file source names into repo, running the command (or training the config) that makes it."""
        if source.config:
            maker = Command(f"training {source.config}", ("ms-ddpm", "train", "--config", source.config))
            cfg = Config.load(REPO / source.config)
            argv = list(maker.argv) + tiny_train_overrides(cfg)
            made_in, result = self.run(maker, argv)
            run_dir = os.path.normpath(cfg.train.output_dir)
        else:
            maker = source.maker
            made_in, result = self.run(maker, self.quick_argv(maker), self.needs(maker))
            run_dir = None
        if result.returncode != 0:
            pytest.fail(f"{cmd.where}: `{cmd}` reads {source.path}, which `{maker}` ({maker.where}) makes, but that "
                        f"failed:\n{tail(result.stderr)}")
        if run_dir is not None:
            shutil.copytree(made_in / run_dir, repo / run_dir, dirs_exist_ok=True)
            if source.path != run_dir and not (repo / source.path).exists():  # the checkpoint under the shown name
                newest = sorted((repo / run_dir).glob("ckpt_*.ckpt"))[-1]
                shutil.copy2(newest, repo / source.path)
        elif (made_in / source.path).is_dir():
            shutil.copytree(made_in / source.path, repo / source.path, dirs_exist_ok=True)
        else:
            (repo / source.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(made_in / source.path, repo / source.path)

    def needs(self, cmd):
        """The sources of a command this runner can provide, or a skip naming the one it cannot."""
        prog = program_of(cmd)
        _, namespace = parse(cmd, prog)
        cfg = check_train_config(cmd, namespace) if canonical(prog, namespace) == "ms-ddpm train" else None
        found = sources(cmd, prog, cfg)
        for source in found:
            reason = self.cannot_provide(source)
            if reason:
                pytest.skip(f"`{cmd}` needs {source.path}, {reason}")
        return found

    def cannot_provide(self, source):
        if source.brought:
            return "which the reader brings (no command shown makes it)"
        if source.config:
            device = Config.load(REPO / source.config).train.device
            return None if device == "CPU" else f"a checkpoint of {source.config}, which trains on {device}"
        maker = source.maker
        prog = program_of(maker)
        if prog.name in OFFLINE:
            return f"which `{maker}` ({maker.where}) makes: it {OFFLINE[prog.name]}"
        if prog.name in LAUNCHERS or prog.name in LONG:
            return f"which `{maker}` ({maker.where}) makes, a long run"
        _, namespace = parse(maker, prog)
        cfg = check_train_config(maker, namespace) if canonical(prog, namespace) == "ms-ddpm train" else None
        for inner in sources(maker, prog, cfg):
            reason = self.cannot_provide(inner)
            if reason:
                return f"which `{maker}` ({maker.where}) makes from {inner.path}, {reason}"
        return None

    @staticmethod
    def quick_argv(cmd):
        """cmd as written with the size overrides of its program appended."""
        prog = program_of(cmd)
        _, namespace = parse(cmd, prog)
        name = canonical(prog, namespace)
        if name == "ms-ddpm train":
            return list(cmd.argv) + tiny_train_overrides(Config.load(namespace.config, namespace.set))
        return list(cmd.argv) + SIZE.get(name, LONG.get(name, []))


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return Runner(tmp_path_factory.mktemp("commands"))


# --- launchers: their own checks run, the training they start stood in ------------------------------------------
STAND_IN_MSRUN = '#!/usr/bin/env bash\nprintf "%s\\0" "$@" > msrun_args\n'
STAND_IN_TRAIN = 'import os, sys\nopen(f"train_args_{os.environ[\'RANK_ID\']}", "w").write("\\0".join(sys.argv))\n'


def check_launcher(cmd, prog, runner):
    """Run the launcher as written (a free port for msrun's scheduler) with msrun or train.py stood in, and check the
    `ms-ddpm train` arguments it passes on. Returns the training config."""
    if prog.name == "scripts/run_distributed.sh":
        repo = runner.sandbox()
        (repo.parent / "bin").mkdir()
        (repo.parent / "bin" / "msrun").write_text(STAND_IN_MSRUN)
        (repo.parent / "bin" / "msrun").chmod(0o755)
        argv = ["bash", prog.script, *before_separator(prog.args, ["--master_port", str(free_port())])]
        env = runner.env(repo.parent / "bin")
    else:
        repo = runner.sandbox(stand_in_train=STAND_IN_TRAIN)
        argv, env = ["bash", prog.script, *prog.args], runner.env()
    for source in sources(cmd, prog):
        if source.brought:  # a rank table: the launcher only checks that it exists
            (repo / source.path).write_text("{}")
    result = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(f"{cmd.where}: `{cmd}` is refused by {prog.script}:\n{tail(result.stderr)}")
    records = [repo / "msrun_args"] if (repo / "msrun_args").exists() else sorted(repo.glob("train_args_*"))
    assert records, f"{cmd.where}: `{cmd}` started no training"
    passed = records[0].read_text().rstrip("\0").split("\0")
    train_args = passed[next(i for i, a in enumerate(passed) if a.endswith("train.py")) + 1:]
    inner = Command(cmd.where, ("python", "scripts/train.py", *train_args))
    _, namespace = parse(inner, program_of(inner))
    return check_train_config(cmd, namespace)


# --- what each test does ---------------------------------------------------------------------------------------
def check_offline(cmd, prog):
    if prog.name == "pip":
        setup = ast.parse((REPO / "setup.py").read_text())
        extras = next(ast.literal_eval(k.value) for node in ast.walk(setup) if isinstance(node, ast.Call)
                      for k in node.keywords if k.arg == "extras_require")
        for target in prog.args[1:]:
            path, _, wanted = re.fullmatch(r"([^\[]+)(\[(.*)\])?", target).group(1, 2, 3)
            if not target.startswith("-"):
                assert (REPO / path / "setup.py").is_file(), f"{cmd.where}: `{cmd}`: no setup.py in {path}"
                missing = set(filter(None, (wanted or "").split(","))) - set(extras)
                assert not missing, f"{cmd.where}: `{cmd}`: setup.py has no extra(s) {sorted(missing)}"
    else:
        url = prog.args[-1]
        assert re.fullmatch(r"https://\S+/[^/]+", url), f"{cmd.where}: `{cmd}`: not a download of one file"


def check_suite(cmd, prog):
    markers = configparser.ConfigParser()
    markers.read(REPO / "setup.cfg")
    registered = {line.split(":")[0].strip() for line in markers["tool:pytest"]["markers"].splitlines() if line}
    args = list(prog.args)
    for flag, expression in zip(args, args[1:]):
        if flag == "-m":
            unknown = set(re.findall(r"\w+", expression)) - registered - {"not", "and", "or"}
            assert not unknown, f"{cmd.where}: `{cmd}` selects unregistered marker(s) {sorted(unknown)}"


def is_cpu(cfg):
    return cfg.train.device == "CPU"


def train_args(prog):
    """The arguments of a training command (ms-ddpm train, scripts/train.py), or None for other programs."""
    if prog.name == "ms-ddpm train":
        return list(prog.args[1:])
    return list(prog.args) if prog.script == "scripts/train.py" else None


def long_run(cmd):
    """For -m slow: "as written", "with size overrides", or None when the command has no long run here. Decided from
    the words alone (this runs when the tests are collected)."""
    try:
        prog = program_of(cmd)
    except pytest.fail.Exception:
        return None  # test_command_as_shown reports it
    args = train_args(prog)
    if prog.name in LONG:
        return "with size overrides"
    if prog.name == "scripts/run_distributed.sh":
        config = prog.args[prog.args.index("--config") + 1]
        device = prog.args[prog.args.index("--device") + 1] if "--device" in prog.args else None
        return "as written" if (device or Config.load(REPO / config).train.device) == "CPU" else None
    if args is not None and len(args) == 2 and args[0] == "--config" and args[1].endswith("_cpu.yaml"):
        return "as written"  # a full training run of a config made for CPUs: the quick start
    if args is not None and "--resume" not in args and not (len(args) == 2 and args[0] == "--config"):
        return "with size overrides"  # the default run trains each config once (see test_command_as_shown)
    return None


def long_argv(cmd, runner):
    prog = program_of(cmd)
    if long_run(cmd) == "with size overrides":
        return runner.quick_argv(cmd)
    if prog.name in LAUNCHERS:  # a free port for msrun's scheduler: another job may hold the default one
        return ["bash", prog.script, *before_separator(prog.args, ["--master_port", str(free_port())])]
    return list(cmd.argv)


def test_commands_were_found():
    assert any(c.where.startswith("README.md") for c in FULL) and any(c.inline for c in COMMANDS)


@pytest.mark.parametrize("cmd", FULL, ids=lambda c: c.where)
def test_command_as_shown(cmd, runner):
    prog = program_of(cmd)
    if prog.name in OFFLINE:
        check_offline(cmd, prog)
        pytest.skip(f"`{cmd}` {OFFLINE[prog.name]}")
    if prog.name == "pytest":
        check_suite(cmd, prog)
        pytest.skip(f"`{cmd}` runs the test suite itself")
    if prog.name in LAUNCHERS:
        cfg = check_launcher(cmd, prog, runner)
        if long_run(cmd) is None:
            device = "Ascend" if prog.name.endswith("_ascend.sh") else cfg.train.device
            pytest.skip(f"`{cmd}` needs {device} devices (checked with the training stood in)")
        pytest.skip(f"`{cmd}` runs for real with -m slow (checked here with msrun stood in)")
    needs = runner.needs(cmd)
    if prog.name in LONG:
        pytest.skip(f"`{cmd}` is long: `python -m pytest -m slow` runs it with size overrides")
    if long_run(cmd) == "with size overrides":  # a graph compile each: once per config is enough for the default run
        pytest.skip(f"`{cmd}` trains a config the default run already trains: `-m slow` runs it with size overrides")
    argv = runner.quick_argv(cmd)
    _, result = runner.run(cmd, argv, needs)
    assert result.returncode == 0, (f"{cmd.where}: `{cmd}` failed (run as `{shlex.join(argv)}`):\n"
                                    f"{tail(result.stdout, 10)}\n{tail(result.stderr)}")


@pytest.mark.slow
@pytest.mark.parametrize("cmd", [c for i, c in enumerate(FULL) if long_run(c) is not None  # each command once
                                 and all(c.argv != d.argv for d in FULL[:i])], ids=lambda c: c.where)
def test_long_command_as_shown(cmd, runner):
    if "--config" in cmd.argv:
        data = Config.load(REPO / cmd.argv[cmd.argv.index("--config") + 1]).data
        if data.download and not (REPO / data.root).is_dir():
            pytest.skip(f"`{cmd}` downloads {data.name} into {data.root}; the tests run offline")
    argv = long_argv(cmd, runner)
    needs = [] if program_of(cmd).name in LAUNCHERS else runner.needs(cmd)
    _, result = runner.run(cmd, argv, needs, timeout=3600)
    assert result.returncode == 0, (f"{cmd.where}: `{cmd}` failed (run {long_run(cmd)}: `{shlex.join(argv)}`):\n"
                                    f"{tail(result.stdout, 10)}\n{tail(result.stderr)}")


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.inline], ids=lambda c: c.where)
def test_quoted_command_names_real_options(cmd):
    prog = program_of(cmd)
    if prog.name == "pytest":
        check_suite(cmd, prog)
    if prog.name in OFFLINE or prog.name == "pytest" or prog.name in LAUNCHERS:
        return  # the launchers' options are checked where they are shown in full
    parser, _ = parse(cmd, prog, parse_args=False)
    args = list(prog.args)
    while args:  # down the subcommands (ms-ddpm train / sample / evaluate)
        sub = next((a.choices[args[0]] for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction) and args[0] in a.choices), None)
        if sub is None:
            break
        parser, args = sub, args[1:]
    known = set(parser._option_string_actions)
    unknown = [a.split("=")[0] for a in prog.args if re.match(r"--?[a-zA-Z]", a) and a.split("=")[0] not in known]
    assert not unknown, f"{cmd.where}: `{cmd}`: {prog.name} has no option(s) {unknown}"
    for path, _ in path_tokens(cmd.argv):
        if path.split("/")[0] in ("configs", "scripts", "docs", "tutorials"):
            assert (REPO / path).exists(), f"{cmd.where}: `{cmd}` names {path}, which does not exist"
