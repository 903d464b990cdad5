"""The causal stage's artefacts: one CSV per table, both tables and the settings as JSON, one figure."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mechsteer.causal.necessity import NecessityRow, NecessityTestRow
from mechsteer.causal.sufficiency import SufficiencyRow

NECESSITY_CSV = "necessity.csv"
NECESSITY_TESTS_CSV = "necessity_tests.csv"
SUFFICIENCY_CSV = "sufficiency.csv"
ABLATIONS_PLOT = "ablations.png"
ABLATIONS_JSON = "ablations.json"


def _csv_value(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value


def write_rows_csv(rows: Sequence[Any], path: str | Path) -> Path:
    """One CSV line per row dataclass (dict and list fields as JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    records = [dataclasses.asdict(row) for row in rows]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        for record in records:
            writer.writerow({key: _csv_value(value) for key, value in record.items()})
    return path


def plot_ablations(necessity_rows: Sequence[NecessityRow], sufficiency_rows: Sequence[SufficiencyRow],
                   path: str | Path) -> Path:
    """Left: each behaviour's rate before/after ablation; right: next-sentence rate unsteered/random/steered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if necessity_rows:
        variants = sorted({row.variant for row in necessity_rows})
        titles = list(dict.fromkeys(row.title for row in necessity_rows))
        width = 0.8 / (len(variants) + 1)
        before = {row.title: row.rate_before for row in necessity_rows}
        left.bar([i for i in range(len(titles))], [before[t] for t in titles], width, label="unablated")
        for offset, variant in enumerate(variants, start=1):
            after = {row.title: row.rate_after for row in necessity_rows if row.variant == variant}
            left.bar([i + offset * width for i in range(len(titles))], [after.get(t, 0.0) for t in titles], width,
                     label=f"ablated, {variant}")
        left.set_xticks([i + width * len(variants) / 2 for i in range(len(titles))], titles, rotation=20)
        left.set_ylabel("sentences per trace")
        left.set_title("necessity (thinking model)")
        left.legend(fontsize=8)
    if sufficiency_rows:
        best: dict[str, SufficiencyRow] = {}
        for row in sufficiency_rows:  # the largest coefficient's row per behaviour
            if row.title not in best or row.coeff > best[row.title].coeff:
                best[row.title] = row
        titles = list(best)
        for offset, name in enumerate(("unsteered", "random", "steered")):
            right.bar([i + offset * 0.27 for i in range(len(titles))],
                      [getattr(best[t], name).rate for t in titles], 0.27, label=name)
        right.set_xticks([i + 0.27 for i in range(len(titles))], titles, rotation=20)
        right.set_ylabel("share of next sentences of the behaviour")
        coeffs = sorted({row.coeff for row in best.values()})
        right.set_title(f"sufficiency (base model), coeff {', '.join(f'{c:g}' for c in coeffs)}")
        right.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_outputs(out_dir: str | Path, necessity_rows: Sequence[NecessityRow],
                  sufficiency_rows: Sequence[SufficiencyRow], settings: dict[str, Any] | None = None,
                  necessity_tests: Sequence[NecessityTestRow] = ()) -> dict[str, Path]:
    """``necessity.csv``, ``necessity_tests.csv``, ``sufficiency.csv``, ``ablations.json`` and
    ``ablations.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    if necessity_rows:
        paths["necessity"] = write_rows_csv(necessity_rows, out / NECESSITY_CSV)
    if necessity_tests:
        paths["necessity_tests"] = write_rows_csv(necessity_tests, out / NECESSITY_TESTS_CSV)
    if sufficiency_rows:
        paths["sufficiency"] = write_rows_csv(sufficiency_rows, out / SUFFICIENCY_CSV)
    document = {"settings": settings or {}, "necessity": [dataclasses.asdict(r) for r in necessity_rows],
                "necessity_tests": [dataclasses.asdict(r) for r in necessity_tests],
                "sufficiency": [dataclasses.asdict(r) for r in sufficiency_rows]}
    (out / ABLATIONS_JSON).write_text(json.dumps(document, indent=2, default=str) + "\n")
    paths["json"] = out / ABLATIONS_JSON
    paths["plot"] = plot_ablations(necessity_rows, sufficiency_rows, out / ABLATIONS_PLOT)
    return paths


__all__ = ["ABLATIONS_JSON", "ABLATIONS_PLOT", "NECESSITY_CSV", "NECESSITY_TESTS_CSV", "SUFFICIENCY_CSV", "plot_ablations", "write_outputs",
           "write_rows_csv"]
