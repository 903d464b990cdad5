"""bench/gpu_check.py runs end to end in its --smoke mode on the CPU (tiny shapes, a few tokens)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--device", "cpu",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1]) == report
    assert report["exactness"]["rows_exact"] == "4/4" and report["exactness"]["steered_tokens"] > 0
    for mode in ("revert", "keep"):  # the correction vectors' rule: a random coefficient MLP
        learned = report["exactness"]["learned"][mode]
        assert learned["rows_exact"] == "4/4" and learned["steered_tokens"] > 0
    assert report["skipped"] == []
    for shape, architecture in (("qwen_1.5b", "qwen2.5-math-1.5b"), ("llama_8b", "llama-3.1-8b")):
        phases = report[shape]
        assert phases["base"] == architecture
        assert {"plain_base", "plain_thinking", "activations", "hybrid", "reference_b1"} <= set(phases)
        assert phases["hybrid"]["candidates"] == 24 and phases["hybrid"]["largest_fork"] <= 32
        assert phases["plain_base"]["tokens"] == 2 * 6 and phases["activations"]["sentences"] > 0
        collected, trained = phases["correction_collect"], phases["correction_train"]
        assert collected["traces"] == 4 and 0 < collected["positions"] < collected["tokens"]
        assert trained["steps"] == 1 and trained["train_positions"] > 0 and trained["val_traces"] == 1
        for mode in ("revert", "keep"):
            hybrid = phases[f"correction_hybrid_{mode}"]
            assert hybrid["tokens"] == 2 * 6 and hybrid["steered_fraction"] > 0 and "vs_plain_pair" in hybrid
