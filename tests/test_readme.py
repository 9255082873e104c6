"""Every command the README and the documentation pages show, run as a user runs it, on a small checkpoint named
as they name it.

Commands are parsed from README.md, then from docs/*.md in the site's order (mkdocs.yml), so a line added there is
tested the day it is written; a line
this test does not know how to run fails it. ``surgeon`` lines run the installed console script
(``SURGEON_BIN`` points at another install, e.g. a wheel in a fresh virtual environment, as CI
does), ``yolo`` lines the Ultralytics CLI next to it and ``python`` lines its Python, in one working
folder, in README order; each must exit 0 without a traceback. Only the
arguments that would make CI train for 30 epochs at 640 px on a GPU are shrunk (`SHRINK`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

README = Path(__file__).resolve().parent.parent / "README.md"


def pages() -> list[Path]:
    """README.md, then the documentation pages in the order of the site's navigation."""
    config = yaml.safe_load((README.parent / "mkdocs.yml").read_text())
    docs = README.parent / config.get("docs_dir", "docs")
    return [README] + [docs / next(iter(entry.values())) for entry in config["nav"]]


BIN = Path(os.environ.get("SURGEON_BIN") or Path(sys.executable).with_name("surgeon"))
PYTHON = Path(os.environ.get("SURGEON_PYTHON") or sys.executable)

# README argument -> what CI runs instead (same meaning, a CPU-sized run).
SHRINK = {
    ("--epochs", "30"): ("--epochs", "1"),
    ("--imgsz", "640"): ("--imgsz", "128"),
    ("--batch", "16"): ("--batch", "4"),
    ("--device", "0"): ("--device", "cpu"),
    ("--train", "128"): ("--train", "8"),
    ("--val", "32"): ("--val", "4"),
    ("--reconstruct", "1000"): ("--reconstruct", "5"),
}
# The same for Ultralytics' key=value arguments (in `yolo` lines and Python snippets).
SHRINK_KV = {"epochs=30": "epochs=1", "imgsz=640": "imgsz=128"}
# Lines that are not run here, and why. Anything else that is not a `surgeon` line fails the test.
NOT_RUN = {
    "make demo": "CI runs it (.ci/run)",
    "make test": "this suite is what it runs",
    "make wheel-check": "CI runs it; it runs this file against the wheel",
    ".venv/bin/pytest": "this suite",
}


def readme_blocks() -> tuple[list[str], list[str], list[str]]:
    """(shell command lines, python blocks, yaml blocks) of the README and the documentation, in order."""
    text = "\n\n".join(page.read_text() for page in pages())
    python = re.findall(r"```python\n(.*?)```", text, re.S)
    yamls = re.findall(r"```yaml\n(.*?)```", text, re.S)
    without_fenced = re.sub(r"```.*?```", "", text, flags=re.S)
    commands = [line[4:].split("  #")[0].split(" # ")[0].strip()
                for line in without_fenced.splitlines() if line.startswith("    ") and line.strip()]
    return commands, python, yamls


def shrink(args: list[str]) -> list[str]:
    out = list(args)
    for i in range(len(out) - 1):
        out[i:i + 2] = SHRINK.get((out[i], out[i + 1]), (out[i], out[i + 1]))
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding what the README's commands name: yolov5s.pt (a small YOLOv5), data.yaml, photos/."""
    from surgeon.data import make_dataset
    from surgeon.testing.zoo import save

    folder = tmp_path_factory.mktemp("readme")
    save("yolov5n.yaml", folder / "yolov5s.pt")  # the README's file name; the n scale keeps CI fast
    classic_checkpoint(folder / "yolov5s-classic.pt")
    data = make_dataset(folder / "shapes", n_train=8, n_val=4, imgsz=128)
    shutil.copy(data, folder / "data.yaml")  # the dataset YAML holds absolute paths
    shutil.copytree(folder / "shapes" / "images" / "val", folder / "photos")  # "your photos": any folder of images
    shutil.copytree(README.parent / "examples", folder / "examples")  # the example replacement and its rule
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), folder / "resnet18.pth")  # a torchvision user's file
    return folder


def classic_checkpoint(path: Path) -> None:
    """A classic-repository checkpoint (built by the packaged classic code), or nothing without that package."""
    from surgeon.testing.classic_factory import make_classic_checkpoint, undo_yolov5_import

    with undo_yolov5_import():
        try:
            import yolov5.models.yolo  # noqa: F401
        except ImportError:
            return
    make_classic_checkpoint(path, "yolov5n.yaml", nc=3)


def run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def test_readme_has_commands_to_test():
    commands, python, yamls = readme_blocks()
    assert sum(c.startswith("surgeon ") for c in commands) >= 10 and python and yamls


@pytest.mark.slow
def test_every_readme_command(workdir):
    if not BIN.exists():
        pytest.skip(f"no surgeon console script at {BIN}")
    if os.environ.get("SURGEON_README_COMMANDS_IN_WHEEL_CHECK"):
        pytest.skip("CI runs the README's commands once, against the wheel (make wheel-check)")
    commands, _, _ = readme_blocks()
    ran = []
    for command in commands:
        if any(command.startswith(prefix) for prefix in NOT_RUN):
            continue
        if command.startswith(".venv/bin/python benchmarks/"):
            script = Path(README.parent / shlex.split(command)[1])
            proc = run([str(PYTHON), str(script), "--help"], workdir)  # benchmarks take hours; they must parse
            assert proc.returncode == 0 and "usage" in proc.stdout, f"{command}\n{proc.stderr}"
            continue
        program, *args = shlex.split(command)
        for long, short in SHRINK_KV.items():
            args = [a.replace(long, short) for a in args]
        executables = {"surgeon": BIN, "yolo": BIN.with_name("yolo"), "python": PYTHON}
        assert program in executables, f"README line this test does not know how to run: {command!r}"
        if any("classic" in a for a in args) and not (workdir / "yolov5s-classic.pt").exists():
            continue  # without the classic extra there is no classic checkpoint to build
        proc = run([str(executables[program]), *shrink(args)], workdir)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"`{command}` exited {proc.returncode}:\n{output[-3000:]}"
        assert "Traceback" not in output, f"`{command}`:\n{output[-3000:]}"
        ran.append(command)
    assert len(ran) >= 12
    assert (workdir / "yolov5s-dyn_head.pt").is_file() and (workdir / "out.pt").is_file()
    assert (workdir / "diff.md").is_file() and (workdir / "graph.svg").is_file() and (workdir / "diff.json").is_file()


def test_readme_python_block(workdir):
    _, blocks, _ = readme_blocks()
    for block in blocks:
        proc = run([str(PYTHON), "-c", block], workdir)
        assert proc.returncode == 0, f"{block}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr


def test_readme_rule_example_parses_and_matches(workdir, tmp_path):
    from surgeon.api import inspect_model
    from surgeon.graph.match import match_rules
    from surgeon.graph.rules import load_rule
    from surgeon.modules import builtin_replacements

    _, _, blocks = readme_blocks()
    for i, block in enumerate(blocks):
        assert isinstance(yaml.safe_load(block), dict)
        path = tmp_path / f"rule{i}.yaml"
        path.write_text(block)
        rule = load_rule(path, builtin_replacements())
        inspection = inspect_model(workdir / "yolov5s.pt", imgsz=128)
        assert match_rules(inspection.blocks, [rule], layers=inspection.layers)


def test_installed_package_ships_the_builtin_rules(tmp_path):
    """Run from outside the source tree, so the package found is the installed one (a wheel under CI)."""
    code = ("import surgeon, surgeon.graph.rules as r; print(surgeon.__file__); "
            "print(','.join(r.builtin_rule_names())); print(r.load_rule('dyn_head', "
            "__import__('surgeon.modules', fromlist=['x']).builtin_replacements()).name)")
    proc = run([str(PYTHON), "-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr
    where, names, loaded = proc.stdout.splitlines()
    assert {"dyn_head", "dyn_all", "cot_neck", "dwsep_all"} <= set(names.split(",")) and loaded == "dyn_head"
    if os.environ.get("SURGEON_PYTHON"):
        assert "site-packages" in where, f"not the installed package: {where}"
        import surgeon  # this runner's own helpers must come from the same install, not the source tree

        assert "site-packages" in surgeon.__file__, surgeon.__file__


def test_the_distribution_is_yolo_surgeon_and_its_command_is_surgeon(tmp_path):
    """"surgeon" on the package index is another project: the distribution is yolo-surgeon, the command surgeon."""
    code = ("import importlib.metadata as m; d = m.distribution('yolo-surgeon'); "
            "print(d.version); print(sorted(e.name for e in d.entry_points if e.group == 'console_scripts')); "
            "print(m.metadata('yolo-surgeon')['Summary'])")
    proc = run([str(PYTHON), "-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr
    version, scripts, summary = proc.stdout.splitlines()
    assert scripts == "['surgeon']" and "YOLO" in summary
    shown = run([str(BIN), "--version"], tmp_path)
    assert shown.returncode == 0 and version in shown.stdout, shown.stdout + shown.stderr
