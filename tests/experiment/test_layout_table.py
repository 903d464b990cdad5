"""The run's stage table (mechsteer.experiment.layout) is the one list of stages: the pipeline's
order, the report's expected stages, the config keys' stage names, a sweep's shared stages, the
folders a resumed stage clears and every path inside a run folder are derived from it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import mechsteer
from mechsteer.experiment import keys
from mechsteer.experiment.config import DEMO_CONFIG, RunConfig
from mechsteer.experiment.layout import (
    ALL_STAGES,
    SHARED_STAGES,
    STAGE_TABLE,
    RunPaths,
    stage_spec,
)
from mechsteer.experiment.pipeline import STAGE_BODIES
from mechsteer.experiment.points import SHARED_STAGES as POINTS_SHARED
from mechsteer.experiment.report import expected_stages
from mechsteer.experiment.state import planned, resumed_folders, stages_reading
from mechsteer.hybrid.comparisons import (
    ComparisonRun,
    ComparisonSpec,
    control_names,
    register_comparison,
)
from tests.experiment.conftest import SHORT_RUN


def test_every_list_of_stages_is_the_tables():
    assert [spec.name for spec in planned(DEMO_CONFIG)] + ["report"] == expected_stages(DEMO_CONFIG)
    assert keys.STAGES == tuple(spec.name for spec in ALL_STAGES)
    assert POINTS_SHARED == SHARED_STAGES == ("traces_thinking_train", "activations", "traces_base_train", "taxonomy",
                                              "directions", "disagreements", "correction_vectors", "eval_base",
                                              "eval_thinking")
    assert set(STAGE_BODIES) == {spec.group for spec in ALL_STAGES}  # every group has its body
    for spec in ALL_STAGES:
        assert resumed_folders(spec.name) == ([spec.folder] if spec.streamed else [])
    # switches plan stages, and the comparisons run after the hybrid, before the ablations
    bare = dataclasses.replace(DEMO_CONFIG, tune_split=None, ablations=False, controls=["random_firing"], baselines=[])
    assert [spec.name for spec in planned(bare)] == [
        "traces_thinking_train", "activations", "traces_base_train", "taxonomy", "directions", "eval_base",
        "eval_thinking", "eval_hybrid", "eval_random_firing"]
    corrected = dataclasses.replace(bare, correction_vectors=True)
    assert [spec.name for spec in planned(corrected)][4:7] == ["directions", "disagreements", "correction_vectors"]


def test_run_paths_spell_the_folders_of_the_table(tmp_path):
    paths = RunPaths(tmp_path)
    assert paths.train_traces("thinking") == tmp_path / "traces" / "thinking_train"
    assert paths.hybrid_results() == tmp_path / "eval" / "hybrid" / "results.jsonl"
    assert paths.hybrid_results("only_bias") == tmp_path / "eval" / "only_bias" / "results.jsonl"
    assert paths.tuning_results("c1_w1") == tmp_path / "tuning" / "c1_w1" / "results.jsonl"
    assert paths.plain_eval("base") == tmp_path / "eval" / "base"
    assert [paths.stage(spec.name) for spec in STAGE_TABLE] == [tmp_path / spec.folder for spec in STAGE_TABLE]
    with pytest.raises(KeyError, match="unknown stage 'trace'"):
        paths.stage("trace")


# A run folder's names, as code outside the layout module would spell them by hand.
PATH_LITERALS = re.compile(r"""(["'])(?:stages\.json|report\.json|results\.jsonl|shared_from\.json|(?:traces|eval)/\w+)\1"""
                           r"""|/ (["'])(?:traces|activations|taxonomy|directions|eval|ablations|tuning|thinking_train|"""
                           r"""base_train|hybrid|stages\.json|report\.json|report\.md|results\.jsonl)\2""")


def test_no_run_folder_path_is_spelt_outside_the_layout():
    package = Path(mechsteer.__file__).parent
    found = []
    for source in sorted(package.rglob("*.py")):
        if source.name == "layout.py" or "organisms" in source.parts:  # the organisms' own work folders
            continue
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if PATH_LITERALS.search(line):
                found.append(f"{source.relative_to(package)}:{number}: {line.strip()}")
    assert not found, "run-folder paths spelt by hand (use mechsteer.experiment.layout.RunPaths):\n" + "\n".join(found)


def test_a_plug_in_control_is_a_stage_of_its_own_and_reads_the_hybrids_keys():
    register_comparison(ComparisonSpec("bias_twice", "control",
                                       lambda inputs: ComparisonRun(inputs.make_policy(), inputs.directions)),
                        replace=True)
    assert "bias_twice" in control_names()
    config = RunConfig.from_dict({**SHORT_RUN, "controls": ["bias_twice"]})
    names = [spec.name for spec in planned(config)]
    assert names[names.index("eval_hybrid") + 1] == "eval_bias_twice"
    assert stage_spec("eval_bias_twice").folder == "eval/bias_twice"
    # a change of a key every hybrid evaluation reads reaches it; one only the traces read does not
    assert stages_reading("coefficients", ["eval_bias_twice"]) == ["eval_bias_twice"]
    assert stages_reading("trace_temperature", ["eval_bias_twice"]) == []
    with pytest.raises(ValueError, match="unknown control 'bias_thrice'; registered controls"):
        RunConfig.from_dict({**SHORT_RUN, "controls": ["bias_thrice"]})
