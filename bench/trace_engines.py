"""Throughput of the organism trace stage through each generation engine, one run each.

The thinking organism's greedy traces of the first ``--n`` organism train problems (the demo's
length, 288 new tokens), written with :func:`mechsteer.data.traces.generate_traces`:

- ``bridge``: on the TransformerLens bridge, in batches of ``--batch-size`` (the demo's 50);
- ``server``: through ``transformers serve`` (started here on a free loopback port, stopped after)
  and the ``openai`` engine, ``--concurrency`` requests in flight.

Tokens/s = generated tokens (the traces' token ids after the prompt) / wall time of the stage;
the server's start and its model load (on the first request, timed separately) are not in it.
The server's texts are checked against the bridge's. One JSON object on the last line.

Usage: ``python bench/trace_engines.py --n 100``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from mechsteer.core.http import HTTPSettings
from mechsteer.core.models import load_model
from mechsteer.data.benchmarks import load_benchmark
from mechsteer.data.traces import generate_traces
from mechsteer.engines import OpenAIEngine, load_tokenizer
from mechsteer.organisms import weights_dir

MODEL = "organism-thinking"


def start_server(log: Path, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(
        [sys.executable, "-m", "transformers.cli.transformers", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu"], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process, f"http://127.0.0.1:{port}/v1"
        except httpx.TransportError:
            time.sleep(0.25)
    os.killpg(process.pid, signal.SIGKILL)
    raise SystemExit(f"transformers serve did not start; see {log}")


def generated_tokens(records) -> int:
    return sum(len(r.token_ids) - r.n_prompt_tokens for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=288)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both (the demo's: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problems = load_benchmark("organism", "train", args.n)
    work = Path(tempfile.mkdtemp(prefix="trace_engines."))

    model = load_model(MODEL)
    started = time.perf_counter()
    bridged = generate_traces(model, problems, work / "bridge", max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, progress=False)
    bridge_s = time.perf_counter() - started

    process, url = start_server(work / "server.log", args.threads)
    try:
        engine = OpenAIEngine(url, str(weights_dir("thinking")), load_tokenizer(MODEL), model_name=MODEL,
                              settings=HTTPSettings(timeout=600, max_concurrency=args.concurrency))
        started = time.perf_counter()
        generate_traces(engine, problems[:1], work / "warm", max_new_tokens=args.max_new_tokens, progress=False)
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        served = generate_traces(engine, problems, work / "server", max_new_tokens=args.max_new_tokens,
                                 progress=False)
        server_s = time.perf_counter() - started
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    same = sum(a.text == b.text for a, b in zip(served, bridged, strict=True))
    result = {
        "n_problems": args.n, "max_new_tokens": args.max_new_tokens, "threads": args.threads,
        "bridge": {"seconds": round(bridge_s, 2), "tokens": generated_tokens(bridged),
                   "tokens_per_s": round(generated_tokens(bridged) / bridge_s, 1), "batch_size": args.batch_size},
        "server": {"seconds": round(server_s, 2), "tokens": generated_tokens(served),
                   "tokens_per_s": round(generated_tokens(served) / server_s, 1), "concurrency": args.concurrency,
                   "first_request_s": round(load_s, 2)},
        "same_text": f"{same}/{args.n}",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
