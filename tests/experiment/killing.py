"""A run killed with SIGKILL in the middle of a stage: a subprocess runs the pipeline with one function
replaced by one that kills the process on its n-th call (everything before that call is on disk)."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

KILL_AT_CALL = textwrap.dedent("""
    import importlib, os, signal, sys
    sys.path.insert(0, {repo!r})
    module = importlib.import_module({module!r})
    real = getattr(module, {function!r})
    calls = []
    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == {call!r}:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    # looked up on its module at each call by its callers, so the run calls this one
    setattr(module, {function!r}, dying)
    from mechsteer.experiment.config import RunConfig
    from mechsteer.experiment.pipeline import run_pipeline
    run_pipeline(RunConfig.from_dict({config!r}), {out!r})
""")


def run_killed(config: dict[str, Any], out: Path, module: str, function: str, call: int) -> str:
    """Run (or resume) ``config`` in ``out`` in a subprocess that SIGKILLs itself when ``module.function``
    is called the ``call``-th time; fail unless it died so. Returns its output."""
    script = KILL_AT_CALL.format(repo=str(REPO), module=module, function=function, call=call, config=config,
                                 out=str(out))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == -signal.SIGKILL, \
        f"not killed at call {call} of {module}.{function}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout
