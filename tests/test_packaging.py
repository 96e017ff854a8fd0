"""The wheel a user installs: every module of ms_ddpm, no import of torch, the Python range the README states."""
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_module_and_no_torch_import(tmp_path):
    # built from a copy: setuptools reuses a build/ folder, which would hide a module the package list misses
    src = tmp_path / "src"
    shutil.copytree(ROOT / "ms_ddpm", src / "ms_ddpm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "setup.cfg", "README.md"):
        shutil.copy(ROOT / name, src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("ms_ddpm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        sources = {n: z.read(n).decode("utf-8") for n in names if n.endswith(".py")}
        metadata = next(z.read(n).decode("utf-8") for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = next(z.read(n).decode("utf-8") for n in names if n.endswith(".dist-info/entry_points.txt"))
    in_tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ms_ddpm").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    missing = sorted(in_tree - names)
    assert not missing, f"the wheel lacks {missing}"
    assert "ms-ddpm = ms_ddpm.cli:main" in entry_points
    requires = re.search(r"^Requires-Python: (.+)$", metadata, re.M).group(1)
    low, high = re.search(r"Python (\d\.\d+)-(\d\.\d+)", (ROOT / "README.md").read_text()).groups()
    minor = int(high.split(".")[1]) + 1
    assert set(requires.split(",")) == {f">={low}", f"<3.{minor}"}, requires

    # installed from the wheel alone (no source tree on the path), every module imports and the CLI starts
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__") for n in sources if n.startswith("ms_ddpm/"))
    # torch is a test-only dependency: no module may import it (the weight readers import it only to read a file)
    code = ("import importlib, ms_ddpm, sys; [importlib.import_module(m) for m in sys.argv[1:]]; "
            "assert 'torch' not in sys.modules, 'importing ms_ddpm imported torch'; "
            "from ms_ddpm.cli import main; print(ms_ddpm.__file__); main(['train', '--help'])")
    out = subprocess.run([sys.executable, "-c", code, *modules], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0].startswith(str(target))
