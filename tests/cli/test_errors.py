"""The command line over a table of bad inputs (issue 19): each stops with a non-zero exit and one
last line a person reads (what is wrong, where, the way out), never a traceback; the silent cases
(stale or foreign artefacts reused) are refused. Runs in-process through ``mechsteer.cli.main``."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from mechsteer.activations import ActivationConfig, extract_activations
from mechsteer.cli import main
from mechsteer.core.models import load_model
from mechsteer.data.labels import ground_truth_for
from mechsteer.data.traces import TraceRecord, load_traces
from mechsteer.experiment.config import DEMO_CONFIG
from mechsteer.experiment.state import RunState
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.taxonomy.sweep import sweep_to_folder

PAIR = "organism-base,organism-thinking"


def organism_trace(index: int, start: int, step: int = 4) -> TraceRecord:
    """A trace in the thinking organism's grammar (what ``mechsteer traces`` writes for it)."""
    prompt = f"Q: Cara has {start} shells. Each day Cara gets {step}. How many after 3 days?\nA:\n"
    lines = [f"Plan: start at {start}, add {step} for 3 days."]
    lines += [f"Day {day}: {start + step * (day - 1)} + {step} = {start + step * day}." for day in (1, 2, 3)]
    lines.append(f"The answer is {start + 3 * step}.")
    reasoning = "\n".join(lines)
    generation = reasoning + "\n"
    return TraceRecord(
        problem_id=f"train-0-{index:05d}", benchmark="organism", prompt=prompt, text=prompt + generation,
        generation=generation, reasoning=reasoning, answer_part=reasoning, reasoning_char_start=len(prompt),
        reasoning_char_end=len(prompt) + len(reasoning), token_ids=[], n_prompt_tokens=0,
        prediction=str(start + 3 * step), reference=str(start + 3 * step), correct=True, finish_reason="eos",
        model="organism-thinking",
        settings={"template": "organism", "max_new_tokens": 288, "do_sample": False, "temperature": 1.0,
                  "seed": 0, "stop_strings": [], "batch_size": 8},
    )


def write_traces(folder: Path, traces: list[TraceRecord]) -> Path:
    folder.mkdir(parents=True)
    (folder / "traces.jsonl").write_text("".join(json.dumps(asdict(t)) + "\n" for t in traces))
    return folder


def write_config(folder: Path, name: str, data: object) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


@pytest.fixture(autouse=True)
def no_judge_server(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MECHSTEER_JUDGE_URL", "OPENAI_BASE_URL", "MECHSTEER_JUDGE_MODEL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    paths: dict[str, Path] = {"root": root}
    traces = [organism_trace(i, 10 + 7 * i) for i in range(8)]
    paths["traces"] = write_traces(root / "traces", traces)
    paths["other_traces"] = write_traces(root / "other_traces", [organism_trace(i, 50 + 3 * i, 5) for i in range(8)])
    torn = write_traces(root / "torn_traces", traces)
    lines = (torn / "traces.jsonl").read_text().splitlines(keepends=True)
    lines[3] = lines[3][:40] + "\n"  # damaged in the middle, not a torn tail
    (torn / "traces.jsonl").write_text("".join(lines))
    paths["torn_traces"] = torn
    (root / "empty_folder").mkdir()
    paths["empty_folder"] = root / "empty_folder"

    model = load_model("organism-thinking")
    ground_truth = ground_truth_for("organism")
    assert ground_truth is not None
    activations = root / "activations"
    extract_activations(model, load_traces(paths["traces"]), activations, ActivationConfig(layers=[1, 2]),
                        labeller=ground_truth.label_reasoning, progress=False)
    paths["activations"] = activations
    sweep_to_folder(activations, [1], [3], root / "taxonomy", method="kmeans")
    paths["taxonomy"] = root / "taxonomy"

    claimed = root / "activations_claimed"
    shutil.copytree(activations, claimed)
    manifest = json.loads((claimed / "manifest.json").read_text())
    (claimed / "manifest.json").write_text(json.dumps({**manifest, "model": "organism-base"}))
    paths["activations_claimed"] = claimed
    sweep_to_folder(claimed, [1], [3], root / "taxonomy_claimed", method="kmeans")
    paths["taxonomy_claimed"] = root / "taxonomy_claimed"

    truncated = root / "activations_truncated"
    shutil.copytree(activations, truncated)
    shard = truncated / "shard_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:300])
    paths["activations_truncated"] = truncated

    narrow = DirectionSet(model_name="organism-base", d_model=64, n_layers=model.cfg.n_layers, layer=1,
                          site="resid_post", method="mean", behaviour_ids=[0, 1], titles=["plan", "compute"],
                          directions=torch.randn(2, 64))
    paths["directions_narrow"] = narrow.save(root / "directions_narrow")
    corrupt = dataclasses.replace(narrow, d_model=model.cfg.d_model, directions=torch.randn(2, model.cfg.d_model))
    corrupt.save(root / "directions_corrupt")
    tensors = root / "directions_corrupt" / "directions.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:30])
    paths["directions_corrupt"] = root / "directions_corrupt"

    demo = asdict(DEMO_CONFIG)
    paths["a_file"] = root / "a_file.txt"
    paths["a_file"].write_text("not a folder")
    configs = {
        "list": "- name\n- base_model\n", "scalar": "organism-demo\n", "empty": "", "invalid": "name: [\n",
        "normalise_no": {**demo, "normalise": "no"}, "n_eval_ten": {**demo, "n_eval": "ten"},
        "optimized": {**demo, "direction_method": "optimized"}, "policy_argmax": {**demo, "policy": "argmax"},
        "random_fire": {**demo, "controls": ["random_fire"]},
        "no_model": {**demo, "base_model": "./no/such/model"}, "demo": demo, "demo_seed1": {**demo, "seed": 1},
        "top_p_0": {**demo, "eval_temperature": 0.7, "eval_top_p": 0.0},
        "local_judge": {**demo, "judge": "local:./no/such/judge"}, "http_judge": {**demo, "judge": "http:m"},
    }
    for name, data in configs.items():
        paths[f"config_{name}"] = write_config(root, name, data)
    paths["sweep_list"] = write_config(root, "sweep_list", "- a\n")
    paths["point_list"] = root / "point.json"
    paths["point_list"].write_text("[1, 2]")
    paths["sweep"] = write_config(root, "sweep", {"name": "s", "base": demo, "list": [{"seed": 1}]})

    # A run folder whose taxonomy was made with seed 0.
    state = RunState(root / "run", DEMO_CONFIG)
    for stage in ("traces_thinking_train", "traces_base_train", "activations", "taxonomy"):
        state.run(stage, lambda: {}, log=lambda message: None)
    paths["run"] = root / "run"
    return paths


def ablate_args(files, **changes) -> list[str]:
    args = {"--pair": PAIR, "--traces": str(files["traces"]), "--directions": str(files["activations"]),
            "--out": str(files["root"] / "ablate_out"), **changes}
    return ["ablate", "--ground-truth", "--split", "train", *[item for pair in args.items() for item in pair]]


def directions_args(files, **changes) -> list[str]:
    args = {"--pair": PAIR, "--traces": str(files["traces"]), "--taxonomy": str(files["taxonomy"]),
            "--out": str(files["root"] / "directions_out"), **changes}
    return ["directions", "--split", "train", *[item for pair in args.items() for item in pair]]


# (case, arguments from the fixture's paths, exit code, a fragment the last line must hold)
CASES = [
    # the six silent wrong results, now refused
    ("traces of another model resumed", lambda f: [
        "traces", "--model", "organism-base", "--benchmark", "organism", "--split", "train", "--n", "10",
        "--out", str(f["traces"])], 1, "made with model 'organism-thinking', but 'organism-base' is expected"),
    ("activations of other traces, same count", lambda f: [
        "activations", "--model", "organism-thinking", "--traces", str(f["other_traces"]), "--layers", "1,2",
        "--batch-size", "8", "--out", str(f["activations"])], 1, "different traces (digest)"),
    ("taxonomy of a manifest claiming another model", lambda f: [
        "taxonomy", "--activations", str(f["activations_claimed"]), "--model", "organism-thinking",
        "--n-latents", "3", "--out", str(f["root"] / "tax_out")], 1, "made with model 'organism-base'"),
    ("directions from a taxonomy of another model", lambda f: directions_args(
        f, **{"--taxonomy": str(f["taxonomy_claimed"])}), 1, "made with model 'organism-base', but 'organism-thinking'"),
    ("directions from a taxonomy of other traces", lambda f: directions_args(
        f, **{"--traces": str(f["other_traces"])}), 1, "traces of digest"),
    ("normalise: no", lambda f: ["run", "--config", str(f["config_normalise_no"]), "--out", str(f["root"] / "r1")],
     2, "normalise = 'no' is not a list[bool]"),
    # configs refused before any model loads
    ("n_eval: ten", lambda f: ["run", "--config", str(f["config_n_eval_ten"]), "--out", str(f["root"] / "r2")],
     2, "n_eval = 'ten' is not an int"),
    ("direction_method: optimized", lambda f: [
        "run", "--config", str(f["config_optimized"]), "--out", str(f["root"] / "r3")], 2,
     "unknown direction_method 'optimized'"),
    ("policy: argmax", lambda f: ["run", "--config", str(f["config_policy_argmax"]), "--out", str(f["root"] / "r4")],
     2, "unknown policy 'argmax'"),
    ("controls: [random_fire]", lambda f: [
        "run", "--config", str(f["config_random_fire"]), "--out", str(f["root"] / "r5")], 2, "'random_fire'"),
    ("model path that does not exist", lambda f: [
        "run", "--config", str(f["config_no_model"]), "--out", str(f["root"] / "r6")], 2, "no such folder"),
    ("YAML list", lambda f: ["run", "--config", str(f["config_list"]), "--out", str(f["root"] / "r7")], 2,
     "holds a list"),
    ("YAML scalar", lambda f: ["run", "--config", str(f["config_scalar"]), "--out", str(f["root"] / "r8")], 2,
     "holds a str"),
    ("YAML empty", lambda f: ["run", "--config", str(f["config_empty"]), "--out", str(f["root"] / "r9")], 2,
     "is empty"),
    ("YAML invalid", lambda f: ["run", "--config", str(f["config_invalid"]), "--out", str(f["root"] / "r10")], 2,
     "not valid YAML"),
    ("config file missing", lambda f: ["run", "--config", str(f["root"] / "nope.yaml"), "--out", "x"], 2,
     "no such run config file"),
    ("run --out a file", lambda f: ["run", "--config", str(f["config_demo"]), "--out", str(f["a_file"])], 2,
     "is a file, not a folder"),
    ("changed key of a finished stage", lambda f: [
        "run", "--config", str(f["config_demo_seed1"]), "--out", str(f["run"])], 2, "seed: 0 -> 1 (read by traces_thinking_train, traces_base_train, taxonomy)"),
    ("demo --n 0", lambda f: ["demo", "--n", "0", "--out", str(f["root"] / "demo")], 2, "argument --n: must be >= 1"),
    ("sweep file holding a list", lambda f: ["sweep", "--config", str(f["sweep_list"])], 2, "holds a list"),
    ("sweep point that is no object", lambda f: [
        "sweep", "--config", str(f["sweep"]), "--out", str(f["root"] / "sw"), "--point", str(f["point_list"])], 2,
     "not a JSON object"),
    # arguments parsed up front
    ("traces --n 0", lambda f: ["traces", "--model", "organism-base", "--benchmark", "organism", "--n", "0",
                                "--out", str(f["root"] / "t0")], 2, "argument --n: must be >= 1"),
    ("traces --temperature nan", lambda f: ["traces", "--model", "organism-base", "--benchmark", "organism",
                                            "--temperature", "nan", "--out", str(f["root"] / "t3")], 2,
     "argument --temperature: must be a finite number >= 0, got nan"),
    ("traces --top-p 0", lambda f: ["traces", "--model", "organism-base", "--benchmark", "organism",
                                    "--top-p", "0", "--out", str(f["root"] / "t4")], 2,
     "argument --top-p: must be a finite number > 0 and <= 1, got 0"),
    ("eval_top_p: 0", lambda f: ["run", "--config", str(f["config_top_p_0"]), "--out", str(f["root"] / "r11")],
     2, "eval_top_p = 0 keeps no token"),
    ("local judge of a missing folder", lambda f: [
        "run", "--config", str(f["config_local_judge"]), "--out", str(f["root"] / "r12")], 2,
     "judge 'local:./no/such/judge': no such folder"),
    ("http judge without an address", lambda f: [
        "run", "--config", str(f["config_http_judge"]), "--out", str(f["root"] / "r13")], 2,
     "judge 'http:m' needs the server's address: set MECHSTEER_JUDGE_URL"),
    ("taxonomy --judge http without an address", lambda f: [
        "taxonomy", "--activations", str(f["activations"]), "--judge", "http", "--out", str(f["root"] / "tax6")], 2,
     "--judge: judge 'http' needs the server's address"),
    ("traces of a missing model folder", lambda f: [
        "traces", "--model", "./no/such/model", "--benchmark", "organism", "--out", str(f["root"] / "t1")], 2,
     "no such folder"),
    ("traces of an unknown benchmark", lambda f: [
        "traces", "--model", "organism-base", "--benchmark", "gsm9k", "--out", str(f["root"] / "t2")], 2,
     "unknown benchmark 'gsm9k'"),
    ("activations --layers a,b", lambda f: [
        "activations", "--model", "organism-thinking", "--traces", str(f["traces"]), "--layers", "a,b",
        "--out", str(f["root"] / "a1")], 2, "argument --layers"),
    ("activations --layers beyond the model", lambda f: [
        "activations", "--model", "organism-thinking", "--traces", str(f["traces"]), "--layers", "99",
        "--out", str(f["root"] / "a2")], 2, "layer must be in"),
    ("activations of a folder without traces", lambda f: [
        "activations", "--model", "organism-thinking", "--traces", str(f["empty_folder"]), "--layers", "1",
        "--out", str(f["root"] / "a3")], 2, "has no traces.jsonl"),
    ("traces torn in the middle", lambda f: [
        "activations", "--model", "organism-thinking", "--traces", str(f["torn_traces"]), "--layers", "1",
        "--out", str(f["root"] / "a4")], 1, "traces.jsonl, line 4"),
    ("taxonomy of a truncated shard", lambda f: [
        "taxonomy", "--activations", str(f["activations_truncated"]), "--n-latents", "3",
        "--out", str(f["root"] / "tax2")], 1, "shard_00000.safetensors is missing or corrupt"),
    ("taxonomy of no activation folder", lambda f: [
        "taxonomy", "--activations", str(f["empty_folder"]), "--out", str(f["root"] / "tax3")], 1,
     "not an activation run folder"),
    ("taxonomy --n-latents x", lambda f: [
        "taxonomy", "--activations", str(f["activations"]), "--n-latents", "x", "--out", "o"], 2,
     "argument --n-latents"),
    ("taxonomy --layers outside the run", lambda f: [
        "taxonomy", "--activations", str(f["activations"]), "--layers", "7", "--out", str(f["root"] / "tax4")], 2,
     "not in the activation run"),
    ("taxonomy --judge unknown", lambda f: [
        "taxonomy", "--activations", str(f["activations"]), "--judge", "gpt4", "--out", str(f["root"] / "tax5")], 2,
     "unknown judge 'gpt4'"),
    ("directions --pair of one model", lambda f: directions_args(f, **{"--pair": "organism-base"}), 2,
     "argument --pair"),
    ("directions with two label sources", lambda f: [*directions_args(f), "--ground-truth"], 2,
     "either --taxonomy or --ground-truth"),
    ("ablate --coeffs one,two", lambda f: ablate_args(f, **{"--coeffs": "one,two"}), 2, "argument --coeffs"),
    ("ablate a set of another width", lambda f: ablate_args(f, **{"--directions": str(f["directions_narrow"])}), 1,
     "direction set has d_model=64"),
    ("ablate a corrupt set", lambda f: ablate_args(f, **{"--directions": str(f["directions_corrupt"])}), 1,
     "directions.safetensors is corrupt"),
    ("organism train --out a file", lambda f: ["organism", "train", "--out", str(f["a_file"])], 2,
     "is a file, not a folder"),
    ("organism eval of missing weights", lambda f: [
        "organism", "eval", "--weights", str(f["empty_folder"]), "--n", "2"], 2, "no model folder"),
]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses an argument this way
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("case", "argv", "code", "fragment"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_ends_in_one_clear_line(files, capsys, case, argv, code, fragment):
    exit_code, err = run_cli(argv(files), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, f"{case}: nothing on stderr"
    last = lines[-1]
    assert exit_code == code, f"{case}: exit {exit_code}; {last}"
    assert "Traceback" not in err and not last.startswith(("  File", "    ")), f"{case}: {err[-2000:]}"
    assert last.startswith("mechsteer") and "error: " in last, f"{case}: {last}"
    assert fragment in last, f"{case}: {last}"


def test_the_refusals_left_the_folders_as_they_were(files, capsys):
    for name in ("r1", "r2", "r3", "r4", "r5", "r6", "r7", "r11", "r12", "r13", "t3", "t4", "tax6"):
        assert not (files["root"] / name).exists()
    stages = json.loads((files["run"] / "stages.json").read_text())
    assert stages["config"]["seed"] == 0
    assert len((files["traces"] / "traces.jsonl").read_text().splitlines()) == 8


def test_debug_shows_the_traceback(files, capsys, monkeypatch):
    argv = ["run", "--config", str(files["config_policy_argmax"]), "--out", str(files["root"] / "r_debug")]
    from mechsteer.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown policy 'argmax'"):
        main([*argv, "--debug"])
    with pytest.raises(ConfigError):
        main(["--debug", *argv])
    monkeypatch.setenv("MECHSTEER_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(argv)
    monkeypatch.delenv("MECHSTEER_DEBUG")
    assert main(argv) == 2


def test_a_library_value_error_is_one_line_with_its_place(capsys, monkeypatch):
    from mechsteer.cli import info

    def broken(args):
        raise ValueError("something the library refused")

    monkeypatch.setattr(info, "collect_info", lambda: broken(None))
    assert main(["info"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mechsteer: error: something the library refused (ValueError at ")
    assert "test_errors.py" in last and "--debug" in last


def test_a_bug_keeps_its_traceback(monkeypatch):
    from mechsteer.cli import info

    def broken():
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(info, "collect_info", broken)
    with pytest.raises(ZeroDivisionError):
        main(["info"])


def test_clear_judge_cache_keeps_the_cache_of_a_refused_config(files, capsys):
    cached = files["run"] / "taxonomy" / "judge_cache" / "ab" / "abcd.json"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text('{"response": "yes"}')
    # another seed; an HTTP judge (the folder's taxonomy is done, so its address is not asked: the config differs)
    for config, fragment in ((files["config_demo_seed1"], "seed: 0 -> 1"),
                             (files["config_http_judge"], "holds a run of another config")):
        code, err = run_cli(["run", "--config", str(config), "--out", str(files["run"]), "--clear-judge-cache"], capsys)
        assert code == 2 and fragment in err.strip().splitlines()[-1]
        assert cached.is_file()  # the refusal came first
    cached.unlink()
