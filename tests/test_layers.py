"""The package's layering (setup.cfg's import-linter contracts), no import cycles, and an ``import surgeon`` that
changes nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import networkx as nx
import pytest

import surgeon

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(surgeon.__file__).parent
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"

pytestmark = pytest.mark.skipif(not (ROOT / "setup.cfg").is_file() or PACKAGE.parent != ROOT,
                                reason="checks the source tree (not an installed wheel)")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--config", str(root / "setup.cfg"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_hold():
    run = _lint(ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "3 kept, 0 broken" in run.stdout


@pytest.mark.parametrize("module, upward", [
    ("checkpoint/io.py", "surgeon.api"),  # the loader reaching the pipeline, as it once did to replay surgery
    ("families/classic.py", "surgeon.recovery.finetune"),
    ("cli.py", "surgeon.checkpoint.io"),  # the command line past the API
    ("graph/blocks.py", "surgeon.testing.zoo"),  # the product using test support
])
def test_an_upward_import_inside_a_function_breaks_them(module, upward, tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "surgeon", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    target = tmp_path / "surgeon" / module
    target.write_text(target.read_text() + f"\n\ndef _reaches_up():\n    import {upward}  # noqa: F401\n")
    run = _lint(tmp_path)
    assert run.returncode == 1 and "BROKEN" in run.stdout, run.stdout[-3000:]
    assert upward in run.stdout


def test_no_import_cycle_among_the_package_files():
    graph = grimp.build_graph("surgeon")  # every import statement, those inside functions too
    imports = nx.DiGraph((m, n) for m in graph.modules for n in graph.find_modules_directly_imported_by(m))
    cycles = [sorted(c) for c in nx.strongly_connected_components(imports) if len(c) > 1]
    assert not cycles


def test_import_surgeon_loads_nothing_heavy_and_changes_nothing():
    probe = ("import os, sys; before = (len(sys.meta_path), dict(os.environ)); import surgeon; "
             "print(len(sys.meta_path) - before[0], sorted(set(os.environ.items()) ^ set(before[1].items())), "
             "sorted(m for m in ('torch', 'ultralytics', 'surgeon.api') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.split() == ["0", "[]", "[]"], run.stdout
    # Public names are there when used.
    names = subprocess.run([sys.executable, "-c", "import surgeon; print(surgeon.apply.__module__, "
                            "surgeon.load.__module__, surgeon.replacement.__module__)"],
                           capture_output=True, text=True, timeout=120, check=True)
    assert names.stdout.split() == ["surgeon.api", "surgeon.surgery.replay", "surgeon.modules.registry"]
