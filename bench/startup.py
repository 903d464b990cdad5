"""How long the command line takes to start: ``mechsteer --help`` and ``python -c "import mechsteer"``.

Each is run ``--repeats`` times (default 3) in a fresh interpreter (this Python, the repository
on ``PYTHONPATH``, offline), and the median wall time is printed with every run's; the first run
may pay for a cold file cache. A measurement, not a test: on a busy machine the numbers grow.
One JSON object on the last line.

Usage: ``python bench/startup.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS: dict[str, list[str]] = {
    "mechsteer --help": [sys.executable, "-m", "mechsteer.cli", "--help"],
    "import mechsteer": [sys.executable, "-c", "import mechsteer"],
}


def wall_seconds(command: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command (default 3)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    report: dict[str, object] = {"python": sys.executable, "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    for name, command in COMMANDS.items():
        runs = [wall_seconds(command) for _ in range(args.repeats)]
        report[name] = {"median_s": round(statistics.median(runs), 2), "runs_s": [round(run, 2) for run in runs]}
        print(f"{name}: median {statistics.median(runs):.2f} s over {args.repeats} runs", file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
