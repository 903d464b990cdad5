"""The accuracy table of a finished run folder, restricted to a slice of its evaluation problems.

For a confirmation on problems no earlier run evaluated: run a config with a larger ``n_eval`` (the
first problems of the split are the same, in the same order) and read the new slice only, e.g.
the README's check of the demo on test problems 200-399:

    python experiments/run_slice.py --run runs/demo-confirm400 --start 200 --end 400
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mechsteer.core.store import read_jsonl
from mechsteer.grading.statistics import gap_recovered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished run folder")
    parser.add_argument("--start", type=int, required=True, help="first problem (0-based, in the split's order)")
    parser.add_argument("--end", type=int, required=True, help="one past the last problem")
    args = parser.parse_args()
    run = Path(args.run)
    order = [record["problem_id"] for record in read_jsonl(run / "eval" / "base" / "traces.jsonl")]
    chosen = set(order[args.start : args.end])
    if len(chosen) != args.end - args.start:
        raise SystemExit(f"{run} evaluated {len(order)} problems; the slice [{args.start}, {args.end}) needs more")

    def correct(path: Path) -> list[bool]:
        return [bool(record["correct"]) for record in read_jsonl(path) if record["problem_id"] in chosen]

    base = correct(run / "eval" / "base" / "traces.jsonl")
    thinking = correct(run / "eval" / "thinking" / "traces.jsonl")
    print(f"problems {args.start}-{args.end - 1} of {run}: base {sum(base) / len(base):.3f}, "
          f"thinking {sum(thinking) / len(thinking):.3f}")
    for folder in sorted(path for path in (run / "eval").iterdir() if (path / "results.jsonl").is_file()):
        records = [r for r in read_jsonl(folder / "results.jsonl") if r["problem_id"] in chosen]
        model = [bool(r["correct"]) for r in records]
        steered = sum(r["steered_fraction"] for r in records) / len(records)
        accuracy = sum(model) / len(model)
        recovered = gap_recovered(accuracy, sum(base) / len(base), sum(thinking) / len(thinking))
        print(json.dumps({"model": folder.name, "accuracy": round(accuracy, 3),
                          "gap_recovered": None if recovered is None else round(recovered, 3),
                          "tokens_steered_fraction": round(steered, 3)}))


if __name__ == "__main__":
    main()
