"""Config keys that describe themselves (mechsteer.experiment.keys): every list the top floor used
to keep by hand is derived from the keys' declarations, the digests of existing run folders stay
as they were, a key changed after a stage that does not read it resumes the run, and a folder is
never resumed in another precision."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_args

import pytest

from mechsteer.core.errors import ConfigError
from mechsteer.core.store import read_json, write_json_atomic
from mechsteer.experiment.config import DEMO_CONFIG, DEMO_GRID_CONFIG, RunConfig
from mechsteer.experiment.keys import STAGES, KeySection, key, key_infos, stage_keys
from mechsteer.experiment.state import RunState
from tests.experiment.configs import OLD_DEMO

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
# The digests run folders were written under before the keys declared themselves (the paper pairs' and
# organism-demo-correction.yaml's since they gained the correction vectors' controls).
DIGESTS = {
    "llama-3.1-8b__r1-distill-llama-8b__gsm8k.yaml": "2b61a9111da56867",
    "llama-3.1-8b__r1-distill-llama-8b__math500.yaml": "e6faf98d44f3cbcf",
    "organism-demo-confirm400.yaml": "40378eac4881d884",
    "organism-demo-correction-confirm400.yaml": "e60099a09937132b",
    "organism-demo-correction.yaml": "3bd76227a2412896",
    "organism-demo-grid.yaml": "5bb21fe8cacc04eb",
    "organism-demo.yaml": "ebe52ff6cdea9cb7",
    "qwen2.5-0.5b__open-reasoner-zero-0.5b__gsm8k.yaml": "beb8a24b30a827e8",
    "qwen2.5-0.5b__open-reasoner-zero-0.5b__math500.yaml": "e035d970a9632b50",
    "qwen2.5-1.5b__open-reasoner-zero-1.5b__gsm8k.yaml": "9e28a919285697c0",
    "qwen2.5-1.5b__open-reasoner-zero-1.5b__math500.yaml": "d035b8270c55682a",
    "qwen2.5-14b__r1-distill-qwen-14b__gsm8k.yaml": "1d60358ed1a443f2",
    "qwen2.5-14b__r1-distill-qwen-14b__math500.yaml": "eae9fefb380e053a",
    "qwen2.5-32b__open-reasoner-zero-32b__gsm8k.yaml": "9a72e95b8df879bb",
    "qwen2.5-32b__open-reasoner-zero-32b__math500.yaml": "898dca1a401ed268",
    "qwen2.5-32b__qwq-32b__gsm8k.yaml": "b5ed682b13884b38",
    "qwen2.5-32b__qwq-32b__math500.yaml": "8c91f25d8a92ef2d",
    "qwen2.5-32b__r1-distill-qwen-32b__gsm8k.yaml": "b99d0bdd8162dd94",
    "qwen2.5-32b__r1-distill-qwen-32b__math500.yaml": "738fbb970ca69138",
    "qwen2.5-7b__open-reasoner-zero-7b__gsm8k.yaml": "d0704f971f417976",
    "qwen2.5-7b__open-reasoner-zero-7b__math500.yaml": "d14e7eae7b3900fa",
    "qwen2.5-math-1.5b__r1-distill-qwen-1.5b__gsm8k.yaml": "d9d729f89b71e027",
    "qwen2.5-math-1.5b__r1-distill-qwen-1.5b__math500.yaml": "6bec068305325497",
}


def test_every_key_is_declared_with_its_metadata():
    for field in dataclasses.fields(RunConfig):
        assert "key" in field.metadata, f"RunConfig.{field.name} is not declared with mechsteer.experiment.keys.key"
    infos = key_infos(RunConfig)
    for name, info in infos.items():
        assert info.read_by is None or set(info.read_by) <= set(STAGES), name
        assert info.kind == "computed" or not info.read_by, name  # a key outside the digest changes no result


def test_every_key_says_where_it_is_listed_and_what_it_means():
    for name, info in key_infos(RunConfig).items():
        assert info.section in get_args(KeySection), f"RunConfig.{name} declares no section: key(..., section=...)"
        assert info.help.strip() and "\n" not in info.help, f"RunConfig.{name} declares no one-line help: key(..., help=...)"
    with pytest.raises(ValueError, match="one line"):
        key(1, section="run", help="")
    with pytest.raises(ValueError, match="one line"):
        key(1, section="run", help="two\nlines")


def test_every_config_keeps_its_digest():
    assert {path.name: RunConfig.from_yaml(path).digest() for path in sorted(EXPERIMENTS.glob("*.yaml"))} == DIGESTS
    assert DEMO_CONFIG.digest() == DIGESTS["organism-demo.yaml"]
    assert DEMO_GRID_CONFIG.digest() == DIGESTS["organism-demo-grid.yaml"]
    assert OLD_DEMO.digest() == "f2c2834c78ea8dc1"


def test_keys_outside_the_digest_do_not_change_it():
    for name, info in key_infos(RunConfig).items():
        if info.kind != "computed":
            field = next(f for f in dataclasses.fields(RunConfig) if f.name == name)
            value = {"tracking": "x", "placement": "cpu", "connection": "http://127.0.0.1:1/v1"}[info.kind]
            if field.type.startswith(("bool", "Annotated[float", "Annotated[int")):
                value = 7 if "int" in field.type else (7.0 if "float" in field.type else True)
            assert dataclasses.replace(DEMO_CONFIG, **{name: value}).digest() == DEMO_CONFIG.digest(), name


def finished(out: Path, config: RunConfig, stages: list[str]) -> None:
    """A run folder of ``config`` whose ``stages`` are done (as RunState records them)."""
    state = RunState(out, config)
    for stage in stages:
        state.run(stage, lambda: {}, lambda message: None)


def test_a_hybrid_setting_changed_after_the_traces_resumes_the_run(tmp_path):
    base = dataclasses.replace(DEMO_CONFIG, device="cpu")
    finished(tmp_path, base, ["traces_thinking_train", "activations", "traces_base_train", "taxonomy", "directions"])
    for change in ({"hybrid_max_new_tokens": 64}, {"max_candidates_per_chunk": 8}, {"hybrid_batch_size": 5}):
        RunState(tmp_path, dataclasses.replace(base, **change))  # accepted
    assert "hybrid_max_new_tokens" in stage_keys(RunConfig)["eval_hybrid"]
    assert "hybrid_max_new_tokens" not in stage_keys(RunConfig)["traces_thinking_train"]
    with pytest.raises(ConfigError, match=r"trace_max_new_tokens: None -> 64 \(read by traces_thinking_train"):
        RunState(tmp_path, dataclasses.replace(base, trace_max_new_tokens=64))


def test_a_folder_is_not_resumed_in_another_precision(tmp_path):
    base = dataclasses.replace(DEMO_CONFIG, device="cpu")  # dtype auto: float32 on the CPU
    finished(tmp_path, base, ["traces_thinking_train"])
    entry = read_json(tmp_path / "stages.json", "stages")["stages"]["traces_thinking_train"]
    assert entry["placement"] == {"base": {"device": "cpu", "dtype": "float32"},
                                  "thinking": {"device": "cpu", "dtype": "float32"}}
    with pytest.raises(ConfigError, match=r"dtype: 'auto' -> 'bfloat16'"):
        RunState(tmp_path, dataclasses.replace(base, dtype="bfloat16"))
    # The same config resolving to another dtype (dtype: auto on a GPU machine) is refused too.
    state = read_json(tmp_path / "stages.json", "stages")
    for role in ("base", "thinking"):
        state["stages"]["traces_thinking_train"]["placement"][role]["dtype"] = "bfloat16"
    write_json_atomic(tmp_path / "stages.json", state)
    with pytest.raises(ConfigError, match=r"ran the base model in bfloat16.*set dtype: bfloat16 to resume it"):
        RunState(tmp_path, base)


def test_no_key_a_sweep_varies_downstream_is_read_by_a_shared_stage():
    """Sweep points that differ only in downstream keys share the shared stages' folders: a shared stage
    reading such a key would be reused with another value of it (policy_read and the disagreements stage)."""
    from mechsteer.experiment.layout import SHARED_STAGES

    for name, info in key_infos(RunConfig).items():
        if info.downstream:
            assert info.read_by is not None and not set(info.read_by) & set(SHARED_STAGES), name
    assert "disagreements" in key_infos(RunConfig)["policy_read"].read_by
