"""The documentation site builds with every warning an error, and its Benchmarks page shows what the benchmark
scripts wrote (the commands the pages show are run by tests/test_readme.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not (ROOT / "mkdocs.yml").is_file(), reason="needs the source tree")


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_site_builds_strictly(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "surgeon.api.apply" in api and "Rewrite a model with one or more rules" in api  # from the docstrings
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")}
    assert all((tmp_path / "site" / ("" if p == "index" else p) / "index.html").is_file() for p in pages)


def test_the_benchmarks_page_renders_what_the_scripts_wrote(tmp_path):
    hooks = _hooks()
    assert "No results here yet" in hooks.render(tmp_path)
    (tmp_path / "replacements.json").write_text(json.dumps(
        {"rows": [{"rule": "dw_backbone", "gflops_ratio": 0.5804}, {"rule": "dyn_head", "gflops_ratio": 1.0012}],
         "machine": "2 cores"}))
    page = hooks.render(tmp_path)
    assert "| rule | gflops_ratio |" in page and "| dw_backbone | 0.5804 |" in page and '"machine": "2 cores"' in page
    markdown = (ROOT / "docs" / "benchmarks.md").read_text()
    assert hooks.MARKER in markdown
