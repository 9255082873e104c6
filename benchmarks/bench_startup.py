"""Start-up time of the command line against importing torch, measured side by side in one run.

Each command runs `--repeats` times in a fresh process, interleaved so that load on the machine hits them alike;
the table gives the median wall time and its ratio to ``python -c "import torch"``. ``surgeon --help`` and a bare
``surgeon`` should not import torch at all. Usage::

    python benchmarks/bench_startup.py --repeats 15 --json benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SURGEON = str(Path(sys.executable).with_name("surgeon"))
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "surgeon --help": [SURGEON, "--help"],
    "surgeon --version": [SURGEON, "--version"],
    "python -c 'import surgeon'": [sys.executable, "-c", "import surgeon"],
    "surgeon rules": [SURGEON, "rules"],
}


def measure(repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(repeats):
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, capture_output=True, check=True)
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="runs of each command (median reported)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/startup.json"),
                        help="where to write every number (default benchmarks/results/startup.json)")
    args = parser.parse_args()
    times = measure(args.repeats)
    torch_median = statistics.median(times["python -c 'import torch'"])
    rows = [{"command": name, "median_s": round(statistics.median(t), 4), "min_s": round(min(t), 4),
             "ratio_to_import_torch": round(statistics.median(t) / torch_median, 3)} for name, t in times.items()]
    print(f"{'command':32} {'median s':>9} {'min s':>7} {'vs import torch':>16}")
    for row in rows:
        print(f"{row['command']:32} {row['median_s']:9.3f} {row['min_s']:7.3f} {row['ratio_to_import_torch']:16.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "repeats": args.repeats, "python": sys.version.split()[0],
                                     "machine": platform.processor() or platform.machine()}, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
