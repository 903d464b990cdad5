"""A whole run config is checked before any work (issue 19): every key by its type hint, the
names that must be registered, and a folder that takes a fixed config without redoing work."""

import dataclasses
import json

import pytest

from mechsteer.core.errors import ConfigError
from mechsteer.experiment.config import DEMO_CONFIG, RunConfig
from mechsteer.experiment.layout import stage_spec
from mechsteer.experiment.pipeline import STAGE_BODIES, run_pipeline
from mechsteer.experiment.state import STAGE_KEYS, RunState
from mechsteer.experiment.sweep import SweepSpec, plan_points

DEMO = dataclasses.asdict(DEMO_CONFIG)


@pytest.mark.parametrize(("change", "message"), [
    ({"normalise": "no"}, "normalise = 'no' is not a list[bool]"),  # ran with normalisation on: tuple("no")
    ({"normalise": ["no"]}, "normalise[0] = 'no' is not a bool"),
    ({"n_eval": "ten"}, "n_eval = 'ten' is not an int"),
    ({"n_train": 0}, "n_train = 0 must be >= 1"),
    ({"direction_method": "optimized"}, "unknown direction_method 'optimized'; registered direction methods: "
                                        "['mean', "),
    ({"engine": "vllm"}, "unknown engine 'vllm'; registered engines: ['bridge', "),
    ({"policy": "argmax"}, "unknown policy 'argmax'"),
    ({"controls": ["random_fire"]}, "unknown control 'random_fire'; registered controls"),
    ({"baselines": ["first_token"]}, "unknown baseline 'first_token'; registered baselines"),
    ({"benchmark": "gsm8k", "baselines": ["oracle_timing"]}, "which benchmark 'gsm8k' has none of"),
    ({"n_latents": [1, 4]}, "n_latents[0] = 1 must be >= 2"),
    ({"n_latents": 4}, "n_latents = 4 is not a list[int]"),
    ({"coefficients": ["2"]}, "coefficients[0] = '2' is not a number"),
    ({"ablations": "false"}, "ablations = 'false' is not a bool"),
    ({"optimisation": {"lr": "1e-3"}}, "optimisation: lr = '1e-3' is not a number (it is text: YAML reads 1e-3"),
    ({"optimisation": {"learning_rate": 0.1}}, "unknown optimisation keys ['learning_rate']"),
    ({"judge": "gpt4"}, "unknown judge 'gpt4'"),
    ({"benchmark": "gsm9k"}, "unknown benchmark 'gsm9k'"),
    ({"eval_split": "dev"}, "eval_split = 'dev': benchmark 'organism' has splits"),
    ({"base_template": "chatml"}, "unknown base_template 'chatml'"),
    ({"thinking_model": "./no/such/model"}, "thinking_model './no/such/model': no such folder"),
    ({"taxonomy_method": "kmeans"}, "taxonomy_method 'kmeans' has no SAE"),
    ({"sae_k": 5}, "sae_k = 5 is more than the smallest n_latents (4)"),
    ({"wandb_mode": "on"}, "unknown wandb_mode 'on'"),
    ({"n_layerz": 3}, "unknown config keys ['n_layerz']"),
])
def test_refused_values_name_their_key(change, message):
    with pytest.raises(ConfigError) as refused:
        RunConfig.from_dict({**DEMO, **change})
    assert message in str(refused.value)


def test_every_problem_is_named_at_once():
    with pytest.raises(ConfigError) as refused:
        RunConfig.from_dict({**DEMO, "n_eval": "ten", "policy": "argmax"})
    assert "n_eval = 'ten'" in str(refused.value) and "unknown policy 'argmax'" in str(refused.value)


@pytest.mark.parametrize(("text", "message"), [
    ("- a\n- b\n", "holds a list"),
    ("just text\n", "holds a str"),
    ("", "is empty"),
    ("name: [\n", "line 2: not valid YAML"),
    ("name: x\n", "missing required config keys ['base_model', 'thinking_model', 'benchmark']"),
])
def test_yaml_that_is_no_mapping_gives_one_clear_error(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        RunConfig.from_yaml(path)
    assert str(path) in str(refused.value) and message in str(refused.value)
    with pytest.raises(ConfigError, match="no such run config file"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")


def test_a_refused_config_never_touches_the_folder(tmp_path):
    for change in ({"policy": "argmax"}, {"n_eval": "ten"}, {"controls": ["random_fire"]}):
        with pytest.raises(ConfigError):
            run_pipeline(dataclasses.replace(DEMO_CONFIG, **change), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_folder_continues_when_only_keys_of_stages_not_run_differ(tmp_path):
    state = RunState(tmp_path, DEMO_CONFIG)
    for stage in ("traces_thinking_train", "traces_base_train", "activations", "taxonomy"):
        state.run(stage, lambda: {}, log=lambda message: None)
    # A typo fixed in a key the directions and the hybrid read: the finished stages are kept.
    fixed = dataclasses.replace(DEMO_CONFIG, direction_method="mean", policy="threshold")
    assert RunState(tmp_path, fixed).done("taxonomy")
    # A key a finished stage read: refused, naming the key, both values and the stage.
    with pytest.raises(ConfigError) as refused:
        RunState(tmp_path, dataclasses.replace(fixed, n_latents=[4, 5]))
    message = str(refused.value)
    assert "n_latents: [4, 5, 6, 8] -> [4, 5] (read by taxonomy)" in message and "use another --out" in message
    assert json.loads((tmp_path / "stages.json").read_text())["config"]["n_latents"] == [4, 5, 6, 8]


def test_every_stage_the_keys_name_is_a_stage_of_the_table_with_a_body():
    for stage in STAGE_KEYS:
        assert stage_spec(stage).group in STAGE_BODIES, stage
    for key in {key for keys in STAGE_KEYS.values() for key in keys}:
        assert key in DEMO, key


def test_sweep_points_go_through_the_same_validator(tmp_path):
    spec = SweepSpec.from_dict({"name": "s", "base": DEMO, "grid": {"policy": ["sae_argmax", "argmax"]}})
    good, refused = plan_points(spec, tmp_path)
    assert good.refused is None
    assert refused.refused is not None and "unknown policy 'argmax'" in refused.refused
    with pytest.raises(ConfigError, match=r"n_eval = 'ten' is not an int"):
        SweepSpec.from_dict({"name": "s", "base": DEMO, "grid": {"n_eval": ["ten"]}})
