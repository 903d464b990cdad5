"""How long the command line takes to start: ``import mechsteer``, ``mechsteer --help``, every
command's ``--help`` and a refused config (``mechsteer run`` on a config with an unknown policy).

Each is run ``--repeats`` times (default 3) in a fresh interpreter (this Python, the repository
on ``PYTHONPATH``, offline), and the median wall time is printed with every run's; the first run
may pay for a cold file cache. A measurement, not a test (tests/cli/test_startup.py checks which
libraries each imports): on a busy machine the numbers grow. One JSON object on the last line.

Usage: ``python bench/startup.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from mechsteer.cli.commands import COMMANDS as CLI_COMMANDS  # noqa: E402  (the table imports nothing heavy)

CLI = [sys.executable, "-m", "mechsteer.cli"]
REFUSED_CONFIG = "refused config"
COMMANDS: dict[str, list[str]] = {
    "import mechsteer": [sys.executable, "-c", "import mechsteer"],
    "mechsteer --help": [*CLI, "--help"],
    **{f"mechsteer {spec.name} --help": [*CLI, spec.name, "--help"] for spec in CLI_COMMANDS},
    REFUSED_CONFIG: [*CLI, "run", "--config", "{bad}", "--out", "{out}"],
}


def wall_seconds(command: list[str], expected_code: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != expected_code:
        raise SystemExit(f"{' '.join(command)} exited {result.returncode}, expected {expected_code}: {result.stderr}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command (default 3)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    report: dict[str, object] = {"python": sys.executable, "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    with tempfile.TemporaryDirectory() as folder:
        bad = Path(folder) / "bad.yaml"
        bad.write_text((REPO / "experiments" / "organism-demo.yaml").read_text() + "\npolicy: nonsense\n")
        for name, command in COMMANDS.items():
            command = [word.format(bad=bad, out=Path(folder) / "out") for word in command]
            expected = 2 if name == REFUSED_CONFIG else 0
            runs = [wall_seconds(command, expected) for _ in range(args.repeats)]
            report[name] = {"median_s": round(statistics.median(runs), 2), "runs_s": [round(run, 2) for run in runs]}
            print(f"{name}: median {statistics.median(runs):.2f} s over {args.repeats} runs", file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
