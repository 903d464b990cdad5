"""``mechsteer export DIR --to gguf|saelens``: a steering vector as a llama.cpp control vector, or the
taxonomy's SAE as a SAELens folder (:mod:`mechsteer.export`); DIR is a run folder or the artefact's own."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Literal, get_args

from mechsteer.cli.commands import add_command
from mechsteer.cli.common import check_output_folder, float_in
from mechsteer.core.errors import ConfigError
from mechsteer.export import source_folder
from mechsteer.export.gguf import (
    BIAS_CHOICE,
    behaviour_choice,
    control_vector,
    write_control_vector,
)
from mechsteer.export.saelens import export_taxonomy_sae
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.taxonomy.artefact import Taxonomy

ExportTarget = Literal["gguf", "saelens"]
EXPORT_TARGETS: tuple[ExportTarget, ...] = get_args(ExportTarget)
GGUF_SUFFIX = ".gguf"


def _export_gguf(args: argparse.Namespace) -> dict[str, object]:
    if args.behaviour is None or args.coefficient is None:
        raise ConfigError(f"--to gguf needs --behaviour (an id, a title or {BIAS_CHOICE!r}) and --coefficient")
    out = Path(args.out)
    if out.suffix != GGUF_SUFFIX or out.is_dir():
        raise ConfigError(f"--out {out}: a control vector is one file; name it *{GGUF_SUFFIX}")
    check_output_folder(out.parent, "--out's folder")
    folder = source_folder(args.dir, "directions")
    directions = DirectionSet.load(folder)
    behaviour = behaviour_choice(directions, args.behaviour)
    if behaviour is None and args.without_bias:
        raise ConfigError(f"--behaviour {BIAS_CHOICE} exports the bias alone; --without-bias would leave nothing")
    vector = control_vector(directions, behaviour, args.coefficient, with_bias=not args.without_bias)
    write_control_vector(vector, out)
    return {"out": str(out), "from": str(folder), "layer": directions.layer, "tensor": f"direction.{directions.layer}",
            "behaviour": vector.behaviour_title, "coefficient": vector.coefficient,
            "includes_bias": vector.includes_bias, "norm": float(vector.directions[directions.layer].norm())}


def _export_saelens(args: argparse.Namespace) -> dict[str, object]:
    unread = [flag for flag, value in (("--behaviour", args.behaviour), ("--coefficient", args.coefficient))
              if value is not None] + (["--without-bias"] if args.without_bias else [])
    if unread:
        raise ConfigError(f"--to saelens exports the taxonomy's whole SAE; drop {', '.join(unread)}")
    out = check_output_folder(args.out)
    folder = source_folder(args.dir, "taxonomy")
    taxonomy = Taxonomy.load(folder)
    export_taxonomy_sae(taxonomy, out)
    return {"out": str(out), "from": str(folder), "layer": taxonomy.provenance.layer,
            "d_sae": taxonomy.provenance.n_latents, "normalised": taxonomy.provenance.normalised}


def run_export_cli(args: argparse.Namespace) -> int:
    summary = _export_gguf(args) if args.to == "gguf" else _export_saelens(args)
    print(json.dumps(summary))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "export",
        description="DIR is a run folder (its directions or taxonomy stage is read) or a directions or taxonomy "
                    "folder. See docs/export.md for the formats, the layer numbering and what each file holds.")
    parser.add_argument("dir", help="a run folder, a directions folder (--to gguf) or a taxonomy folder (--to saelens)")
    parser.add_argument("--to", choices=EXPORT_TARGETS, required=True,
                        help="gguf: one behaviour's steering vector as a llama.cpp control vector; saelens: the "
                             "taxonomy's SAE as a SAELens folder")
    parser.add_argument("--behaviour", default=None,
                        help=f"--to gguf: the behaviour's id or title, or {BIAS_CHOICE!r} for the bias alone")
    parser.add_argument("--coefficient", type=float_in(-math.inf), default=None,
                        help="--to gguf: the coefficient the vector is multiplied by (the hybrid's steering strength)")
    parser.add_argument("--without-bias", action="store_true",
                        help="--to gguf: leave the set's bias out (default: coefficient * (direction + bias), "
                             "what the hybrid adds)")
    parser.add_argument("--out", required=True,
                        help="--to gguf: the .gguf file to write; --to saelens: the folder to write")
    parser.set_defaults(func=run_export_cli)


__all__ = ["EXPORT_TARGETS", "ExportTarget", "register", "run_export_cli"]
