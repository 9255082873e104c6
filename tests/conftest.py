"""Shared fixtures: Ultralytics kept offline, real models built from the package's own configs."""

from __future__ import annotations

import os
import tempfile

# Must run before anything imports ultralytics.
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="surgeon-tests-yolo-"))
from surgeon._env import offline_ultralytics  # noqa: E402

offline_ultralytics()

import platform  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import SEED, THREADS  # noqa: E402


def pytest_report_header(config):
    """Where the numbers came from: a test that trains can hold on one CPU's rounding and not on another's."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return (f"cpu: {cpu}; torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
            f"{THREADS} thread(s), seed offset {SEED} (SURGEON_TEST_THREADS, SURGEON_TEST_SEED)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # The test inputs are small: intra-op threads gain little on them, and on a shared 2-core machine they
    # wait on each other (measured 5-30x slower). Benchmarks keep torch's default.
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    if SEED:  # Ultralytics' trainer seeds itself from its `seed` argument (default 0), not from torch
        from ultralytics.utils import DEFAULT_CFG, DEFAULT_CFG_DICT

        DEFAULT_CFG.seed = DEFAULT_CFG_DICT["seed"] = SEED
    yield
    torch.set_num_threads(threads)


def build_ultralytics(cfg: str):
    """An Ultralytics model from one of the package's own configs, BatchNorm calibrated (see surgeon.testing.zoo),
    eval mode."""
    from surgeon.testing.zoo import build

    return build(cfg)


@pytest.fixture(scope="module")
def yolov8n_model():
    """YOLOv8n straight from its config (uncalibrated, fixed seed), eval mode; one per test module."""
    from ultralytics import YOLO

    # Module fixtures are built before the per-test seed; fix the weights whatever ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return YOLO("yolov8n.yaml").model.eval()


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Returns make(cfg) -> path of an Ultralytics checkpoint of `build_ultralytics(cfg)`, cached per session."""
    from surgeon.testing.zoo import save

    cache: dict[str, str] = {}
    root = tmp_path_factory.mktemp("checkpoints")

    def make(cfg: str) -> str:
        if cfg not in cache:
            cache[cfg] = str(save(cfg, root / cfg.replace(".yaml", ".pt")))
        return cache[cfg]

    return make


@pytest.fixture(scope="session")
def classic_checkpoint(tmp_path_factory):
    """Path of a classic YOLOv5s checkpoint (ultralytics/yolov5 repository layout, ``models.*`` names).

    Built with the real classic code (the PyPI ``yolov5`` package), BatchNorm calibrated like the
    Ultralytics test models; skipped, with the reason shown, where that package is not installed.
    """
    from surgeon.testing.classic_factory import build_classic_model, undo_yolov5_import, write_classic_checkpoint
    from surgeon.testing.zoo import calibrate_batchnorm

    with undo_yolov5_import():
        pytest.importorskip("yolov5.models.yolo", reason="classic checkpoints are built with the PyPI `yolov5` "
                            "package (extra `classic`)")
    model = build_classic_model("yolov5s.yaml", nc=80)
    calibrate_batchnorm(model, torch.rand(4, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    path = tmp_path_factory.mktemp("classic") / "yolov5s.pt"
    write_classic_checkpoint(path, model)
    return str(path)
