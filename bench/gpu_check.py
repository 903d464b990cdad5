"""GPU check: the paper's shapes through every GPU path of mechsteer, as one JSON line.

Random-weight models built in memory from the real configs (tests/tiny_models.py:
Qwen2.5-Math-1.5B / R1-Distill-Qwen-1.5B and Llama-3.1-8B / R1-Distill-Llama-8B, real widths,
depths and vocabularies; nothing is downloaded), in bfloat16 on CUDA, through:

- ``exactness``: the hybrid against its full-recompute oracle on the GPU, in float32 on the tiny
  Qwen2 shape (windows 0 = all, 1 and 3; four coefficients): the share of rows and tokens that match
  (1.0 expected; bf16 is not compared, its rounding differs between the cached and recomputed paths);
  and, under ``learned``, the same for the correction vectors' mode: the coefficient rule "learned"
  (a random-weight CoefficientMLP, vectors without a bias) at the current position, per cache mode
  (``revert``, ``keep``);
- ``qwen_1.5b`` / ``llama_8b``: plain KV-cached generation of each model of the pair (batch 16,
  ``--new-tokens``, EOS ignored), sentence-activation extraction on the thinking model, the hybrid
  with the 24-candidate grid (coefficients 0.2 ... 1.2 x windows 1, 15, 50, 100) at batch 16 with
  random firing at the paper's steering rate (``--steer-rate``, 12%; random-weight models disagree on
  nearly every token, so the paper's rule would steer them all), and the paper-style reference loop
  (batch 1, no caches); then the correction vectors (mechsteer.steering.correction):
  ``correction_collect``, the disagreement collection over ``--correction-traces`` (16) synthetic
  traces of ``--trace-chars`` reasoning, every sentence labelled (K = 50, the library's batch of 8
  traces; time, tokens/s and positions/s), ``correction_train``, one seed and one epoch of the joint
  training of the vectors and the coefficient MLP at the library's settings (steps of 4 traces; time
  per step, held-out passes included), and ``correction_hybrid_revert`` / ``_keep``, the hybrid at
  batch 16 with the trained MLP's coefficient at the current position, random firing as above, in
  each cache mode (ratios to the plain pair and to the grid hybrid). Collection needs one shared
  vocabulary, and the family pairs differ in their added tokens, as the real ones do: the thinking
  model reads with the base's tokenizer there (the synthetic traces use ordinary tokens only). A
  correction phase out of GPU memory says so in its entry, and the hybrid then steers with random
  vectors and MLP of the same shapes (``vectors``: ``random``);

reporting tokens/s, peak GPU memory per phase (``torch.cuda.max_memory_allocated``), the hybrid's
ratio to the plain pair (the issue's target: >= 0.6 at batch 16 on the 1.5B shape) and to the
reference loop, and the steered step's memory bound (``max_candidates_per_chunk`` forked rows, each
a KV cache of the context). Phases past ``--budget-s`` seconds are skipped (and listed), so the
script ends well inside 8 minutes on one H200; ``--skip-llama`` drops the 8B shape, ``--skip PHASE
...`` a shape's phases (``plain``, ``activations``, ``hybrid``, ``reference``, ``correction``; e.g.
``--skip activations reference`` to reach the correction phases of both shapes within the budget).

``--smoke``: tiny shapes, a few tokens, 4 correction traces, on whatever device there is (the CPU in
CI, one thread); it checks that the script runs end to end (tests/test_bench.py runs it) and
measures nothing of interest.

Running it on the lent H200 machine (docs: /work/.library/device/README.md, nvidia-h200 note). That
machine has torch, transformers (5.17), accelerate, jaxtyping, safetensors, tokenizers and pandas,
but not transformer-lens, beartype, datasets (which transformer-lens imports) or datasets' own
dill, multiprocess and xxhash. Carry them as wheels, once, here in the repo root::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl transformer-lens==4.3.0 beartype==0.23.1 datasets==5.2.0 dill==0.4.1 \\
        multiprocess==0.70.19 xxhash==4.1.0

then run, naming ``.whl`` in ``carry`` (mechsteer itself runs from the copied tree, no install)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit; \\
    HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.json

with ``timeout_s`` about 540. The JSON is the last line of the output and ``$OUT/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # mechsteer and tests/ from the tree, installed or not
    sys.path.insert(0, str(REPO))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from mechsteer.activations import ActivationConfig, extract_activations  # noqa: E402
from mechsteer.core.models import resolve_device, wrap_hf_model  # noqa: E402
from mechsteer.data.traces import TraceRecord  # noqa: E402
from mechsteer.hybrid.coefficients import CACHE_MODES  # noqa: E402
from mechsteer.hybrid.generator import HybridConfig, HybridOutput, hybrid_generate  # noqa: E402
from mechsteer.hybrid.reference import (  # noqa: E402
    ReferenceTrace,
    reference_hybrid_generate,
    reference_hybrid_trace,
)
from mechsteer.hybrid.timing import RandomFiringPolicy, SAEArgmaxPolicy  # noqa: E402
from mechsteer.interventions.generation import generate  # noqa: E402
from mechsteer.steering.coefficient_mlp import CoefficientMLP  # noqa: E402
from mechsteer.steering.correction import CorrectionConfig, train_correction_vectors  # noqa: E402
from mechsteer.steering.direction_set import DirectionSet  # noqa: E402
from mechsteer.steering.disagreements import DisagreementSettings, collect_disagreements  # noqa: E402
from mechsteer.steering.framing import reframe_trace  # noqa: E402
from mechsteer.steering.labels import BehaviourLabels  # noqa: E402
from tests.tiny_models import REAL_CONFIGS, REAL_PAIRS, real_config, real_pair_tokenizers  # noqa: E402

GRID_COEFFICIENTS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2)
GRID_WINDOWS = (1, 15, 50, 100)  # 6 x 4 = the 24-candidate grid
N_BEHAVIOURS = 4
PHASES = ("plain", "activations", "hybrid", "reference", "correction")  # a shape's phases, in order (--skip)
LEARNED_MLP_HIDDEN = 16  # the exactness check's random coefficient MLP (trained ones: CorrectionConfig's width)
QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")
REASONING = ("First, I need the clips sold in May. Half of 48 is 24, so she sold 24 clips in May. "
             "Wait, let me check that again. Then the total is 48 plus 24, which is 72. "
             "So the answer should be 72 clips. Let me verify: 24 times 2 is 48, correct. ")


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
        """(result, seconds, peak GiB allocated during the call, on CUDA)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        started = time.perf_counter()
        result = fn()
        self.sync()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        return result, seconds, None if peak is None else round(peak, 2)


def build_pair(arch: str, *, tiny: bool, device: torch.device, dtype: torch.dtype, folder: Path, seed: int = 0):
    """(base, thinking) bridges of a family's pair, random weights initialised on ``device``; one
    vocabulary size for both, as the real pairs have (the tiny ones: the larger tokenizer's, plus 2)."""
    vocab_size = None if tiny else REAL_CONFIGS[REAL_PAIRS[arch][0]]["vocab_size"]
    tokenizers = real_pair_tokenizers(arch, vocab_size)
    model_vocab = vocab_size or max(len(tokenizer) for tokenizer in tokenizers) + 2
    bridges = []
    for offset, (name, tokenizer) in enumerate(zip(REAL_PAIRS[arch], tokenizers, strict=True)):
        tokenizer_dir = folder / f"{name}-tokenizer"
        tokenizer.save_pretrained(tokenizer_dir)  # TL re-loads a tokenizer by its folder
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        _, config = real_config(name, tiny=tiny, vocab_size=model_vocab,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, initializer_range=0.2 if tiny else 0.02)
        torch.manual_seed(seed + offset)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        bridges.append(wrap_hf_model(model, tokenizer, name, device=device, dtype=dtype))
    return bridges[0], bridges[1]


def random_directions(model, layer: int, n_behaviours: int = N_BEHAVIOURS, seed: int = 0, *,
                      bias: bool = True) -> DirectionSet:
    """Random steering vectors; without ``bias``, a set shaped like trained correction vectors."""
    generator = torch.Generator().manual_seed(seed)
    d_model = model.cfg.d_model
    directions = torch.randn(n_behaviours, d_model, generator=generator) * 4.0
    bias_vector = torch.randn(d_model, generator=generator)
    return DirectionSet(model_name=model.cfg.model_name, d_model=d_model, n_layers=model.cfg.n_layers, layer=layer,
                        site="resid_post", method="mean", behaviour_ids=list(range(n_behaviours)),
                        titles=behaviour_titles(n_behaviours), directions=directions,
                        bias=bias_vector if bias else None)


def behaviour_titles(n_behaviours: int = N_BEHAVIOURS) -> list[str]:
    return [f"b{b}" for b in range(n_behaviours)]


class RandomClassifier:
    """A stand-in SAE for the exactness check: a fixed random encoder, on the acts' device."""

    def __init__(self, d_model: int, n_latents: int = 4):
        self.encoder = torch.randn(d_model, n_latents, generator=torch.Generator().manual_seed(0))

    def prepare(self, acts, *, centring_mean=None):
        return acts / acts.norm(dim=-1, keepdim=True)

    def encode_pre(self, x):
        return x @ self.encoder.to(x.device)


def prompts_for(n: int) -> tuple[list[str], list[str]]:
    base = [f"Question {i}: {QUESTION}\nStep by step answer:\n" for i in range(n)]
    return base, [f"Question {i}: {QUESTION}" for i in range(n)]


def match_shares(out: HybridOutput, expected: list[ReferenceTrace]) -> dict[str, Any]:
    """How much of the generator's output equals the oracle's: whole rows, and tokens up to the first difference."""
    rows = tokens = matched = 0
    for row, trace in enumerate(expected):
        rows += out.token_ids[row] == trace.token_ids
        tokens += len(trace.token_ids)
        for got, want in zip(out.token_ids[row], trace.token_ids, strict=False):
            if got != want:
                break
            matched += 1
    steered = sum(log.steered for logs in out.token_logs for log in logs)
    return {"rows_exact": f"{rows}/{len(expected)}", "token_prefix_match": round(matched / max(tokens, 1), 4),
            "steered_tokens": steered}


def exactness(device: torch.device, folder: Path, new_tokens: int) -> dict[str, Any]:
    """The generator against its full-recompute oracle: the grid with the guardrail rule (windows 0,
    1, 3), and the correction vectors' mode, the learned rule (a random CoefficientMLP, vectors
    without a bias) at the current position, in each cache mode."""
    base, thinking = build_pair("qwen2", tiny=True, device=device, dtype=torch.float32, folder=folder / "exact")
    base_prompts, thinking_prompts = prompts_for(4)
    policy = SAEArgmaxPolicy(RandomClassifier(thinking.cfg.d_model))

    def compare(vectors: DirectionSet, config: HybridConfig, coefficient_model: CoefficientMLP | None
                ) -> dict[str, Any]:
        out = hybrid_generate(base, thinking, base_prompts, thinking_prompts, vectors, policy, config,
                              coefficient_model=coefficient_model)
        expected = [reference_hybrid_trace(base, thinking, base_prompt, thinking_prompt, vectors, policy, config,
                                           shared_tokenizer=True, coefficient_model=coefficient_model)
                    for base_prompt, thinking_prompt in zip(base_prompts, thinking_prompts, strict=True)]
        return match_shares(out, expected)

    grid = HybridConfig(steer_layer=1, read_layer=2, coefficients=(0.5, 1.0, 2.0, 4.0), windows=(0, 1, 3),
                        max_new_tokens=new_tokens, ignore_eos=True, batch_size=4)
    result = {"shape": "qwen2 tiny widths, float32", **compare(random_directions(base, 1), grid, None)}
    mlp = CoefficientMLP(base.cfg.d_model, list(range(N_BEHAVIOURS)), LEARNED_MLP_HIDDEN).to(device)
    correction_like = random_directions(base, 1, bias=False)
    result["learned"] = {
        mode: compare(correction_like, HybridConfig(steer_layer=1, read_layer=2, max_new_tokens=new_tokens,
                                                    ignore_eos=True, batch_size=4, coefficient_rule="learned",
                                                    cache_mode=mode), mlp)
        for mode in CACHE_MODES}
    return result


def kv_bytes_per_token(model) -> int:
    cfg = model.cfg
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    return 2 * cfg.n_layers * n_kv * cfg.d_head * torch.tensor([], dtype=cfg.dtype).element_size()


def check_shape(arch: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, folder: Path,
                timer: Timer, deadline: float, skipped: list[str]) -> dict[str, Any]:
    tiny = args.smoke
    base, thinking = build_pair(arch, tiny=tiny, device=device, dtype=dtype, folder=folder / arch)
    result: dict[str, Any] = {"base": base.cfg.model_name, "thinking": thinking.cfg.model_name,
                              "d_model": base.cfg.d_model, "n_layers": base.cfg.n_layers, "vocab": base.cfg.d_vocab,
                              "dtype": str(dtype), "batch": args.batch}
    base_prompts, thinking_prompts = prompts_for(args.batch)
    no_eos: list[int] = []
    generate(base, base_prompts[:2], max_new_tokens=4, eos_token_id=no_eos)  # warm-up (kernels, allocator)
    generate(thinking, thinking_prompts[:2], max_new_tokens=4, eos_token_id=no_eos)

    def over(phase: str) -> bool:
        if any(phase.startswith(name) for name in args.skip):
            skipped.append(f"{arch}:{phase} (--skip)")
            return True
        if time.perf_counter() > deadline:
            skipped.append(f"{arch}:{phase}")
            return True
        return False

    plain_tokens = plain_seconds = 0.0
    for role, model, prompts in (("base", base, base_prompts), ("thinking", thinking, thinking_prompts)):
        if over(f"plain_{role}"):
            continue
        out, seconds, peak = timer.run(lambda m=model, p=prompts: generate(
            m, p, max_new_tokens=args.new_tokens, eos_token_id=no_eos))
        n = sum(len(ids) for ids in out.token_ids)
        plain_tokens, plain_seconds = plain_tokens + n, plain_seconds + seconds
        result[f"plain_{role}"] = {"tokens": n, "seconds": round(seconds, 2), "tokens_per_s": round(n / seconds, 1),
                                   "peak_gib": peak}
    if plain_seconds:
        result["plain_pair_tokens_per_s"] = round(plain_tokens / plain_seconds, 1)

    if not over("activations"):
        traces = synthetic_traces([thinking_prompts[0]] * args.batch, args.trace_chars, thinking.cfg.model_name)
        layers = sorted({thinking.cfg.n_layers // 4, thinking.cfg.n_layers // 2, 3 * thinking.cfg.n_layers // 4})
        manifest, seconds, peak = timer.run(lambda: extract_activations(
            thinking, traces, folder / arch / "activations", ActivationConfig(layers=layers, batch_size=8),
            progress=False))
        result["activations"] = {"traces": len(traces), "sentences": manifest.n_sentences, "layers": layers,
                                 "seconds": round(seconds, 2), "throughput": manifest.throughput, "peak_gib": peak}

    steer_layer, read_layer = int(base.cfg.n_layers * 0.375), int(thinking.cfg.n_layers * 0.75)
    directions = random_directions(base, steer_layer)
    config = HybridConfig(steer_layer=steer_layer, read_layer=read_layer, coefficients=GRID_COEFFICIENTS,
                          windows=GRID_WINDOWS, max_new_tokens=args.hybrid_tokens, ignore_eos=True,
                          batch_size=args.batch, max_candidates_per_chunk=args.chunk)
    if not over("hybrid"):
        policy = RandomFiringPolicy(args.steer_rate, directions.behaviour_ids, seed=0)
        out, seconds, peak = timer.run(lambda: hybrid_generate(base, thinking, base_prompts, thinking_prompts,
                                                               directions, policy, config))
        n = sum(len(ids) for ids in out.token_ids)
        context = max(len(p) for p in base_prompts) + args.hybrid_tokens  # chars ~ tokens for byte tokenizers
        hybrid = {"candidates": len(config.candidates), "tokens": n, "seconds": round(seconds, 2),
                  "tokens_per_s": round(n / seconds, 1), "peak_gib": peak,
                  "steered_fraction": round(sum(out.steered_fractions) / len(out.steered_fractions), 4),
                  "positions_recomputed": out.positions_recomputed, "largest_fork": out.largest_fork,
                  "max_candidates_per_chunk": args.chunk,
                  "fork_cache_bound_gib": round(args.chunk * context * kv_bytes_per_token(base) / 2**30, 3)}
        if "plain_pair_tokens_per_s" in result:
            hybrid["vs_plain_pair"] = round(hybrid["tokens_per_s"] / result["plain_pair_tokens_per_s"], 3)
        result["hybrid"] = hybrid
    if not over("reference"):
        reference_config = HybridConfig(steer_layer=steer_layer, read_layer=read_layer, coefficients=GRID_COEFFICIENTS,
                                        windows=GRID_WINDOWS, max_new_tokens=args.reference_tokens, ignore_eos=True)
        policy = RandomFiringPolicy(args.steer_rate, directions.behaviour_ids, seed=0)
        (ids, _), seconds, peak = timer.run(lambda: reference_hybrid_generate(
            base, thinking, base_prompts[0], thinking_prompts[0], directions, policy, reference_config,
            shared_tokenizer=True))
        result["reference_b1"] = {"tokens": len(ids), "seconds": round(seconds, 2),
                                  "tokens_per_s": round(len(ids) / seconds, 2), "peak_gib": peak}
        if "hybrid" in result:
            result["hybrid"]["vs_reference"] = round(result["hybrid"]["tokens_per_s"] / (len(ids) / seconds), 1)
    check_correction(base, thinking, args, steer_layer, read_layer, folder / arch, timer, over, result)
    return result


def synthetic_traces(prompts: list[str], reasoning_chars: int, model_name: str) -> list[TraceRecord]:
    """One thinking trace per prompt: the prompt and ``reasoning_chars`` characters of REASONING."""
    reasoning = (REASONING * (1 + reasoning_chars // len(REASONING)))[:reasoning_chars]
    return [TraceRecord(problem_id=f"p{i}", benchmark="gsm8k", prompt=prompt, text=prompt + reasoning,
                        generation=reasoning, reasoning=reasoning, answer_part="", reasoning_char_start=len(prompt),
                        reasoning_char_end=len(prompt) + len(reasoning), token_ids=[], n_prompt_tokens=0,
                        prediction=None, reference="72", correct=False, finish_reason="length", model=model_name)
            for i, prompt in enumerate(prompts)]


def sentence_index_labels() -> BehaviourLabels:
    """Every kept sentence labelled, behaviours in turn (a taxonomy's labels stand-in)."""
    return BehaviourLabels(labeller=lambda sentence: sentence.sentence_index % N_BEHAVIOURS,
                           behaviour_ids=list(range(N_BEHAVIOURS)), titles=behaviour_titles(),
                           source="gpu_check: sentence index mod 4")


def check_correction(base, thinking, args: argparse.Namespace, steer_layer: int, read_layer: int, folder: Path,
                     timer: Timer, over: Callable[[str], bool], result: dict[str, Any]) -> None:
    """The correction vectors' phases: disagreement collection over ``--correction-traces`` synthetic
    traces, a short training (one seed, one epoch), and the hybrid with the MLP's coefficient at the
    current position in each cache mode. A phase that runs out of GPU memory says so in its entry;
    training then waits for a collection, and the hybrid steers with random vectors and a random MLP
    of the trained shapes (its cost does not depend on their values)."""

    def guarded(phase: str, fn: Callable[[], Any]) -> tuple[Any, float, float | None] | None:
        try:
            return timer.run(fn)
        except torch.OutOfMemoryError as error:
            result[phase] = {"out_of_memory": str(error).splitlines()[0]}
        free(timer.device)  # out of the handler: its traceback no longer holds the phase's tensors
        return None

    config = CorrectionConfig(seeds=CorrectionConfig().seeds[:1], epochs=1)
    trained = None
    collected = None if over("correction_collect") else collect(base, thinking, args, steer_layer, folder, guarded)
    if collected is not None:
        cache, seconds, peak = collected
        tokens = sum(len(ids) for ids in cache.token_ids)
        result["correction_collect"] = {
            "traces": cache.provenance.n_traces, "tokens": tokens, "positions": cache.n_positions,
            "top_k": cache.provenance.top_k, "batch_size": DisagreementSettings(layer=steer_layer).batch_size,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "positions_per_s": round(cache.n_positions / seconds, 1), "peak_gib": peak}
        titles = dict(enumerate(behaviour_titles()))
        with torch.enable_grad():
            trained_run = None if over("correction_train") else guarded(
                "correction_train", lambda: train_correction_vectors(base, cache, titles, config))
        if trained_run is not None:
            trained, seconds, peak = trained_run
            report = trained.report
            steps = -(-report.n_train_traces // config.batch_size)
            result["correction_train"] = {
                "seeds": len(config.seeds), "epochs": config.epochs, "steps": steps, "batch_traces": config.batch_size,
                "train_positions": report.n_train_positions, "val_traces": report.n_val_traces,
                "seconds": round(seconds, 2),
                # the epoch's steps and three forward-only passes over the held-out traces
                "seconds_per_step": round(seconds / steps, 3), "peak_gib": peak,
                "unsteered_val_kl": round(report.unsteered_val_kl, 4), "best_val_kl": round(report.best_val_kl, 4)}

    if trained is not None and trained.mlp is not None:
        directions, mlp, source = trained.directions, trained.mlp, "trained"
    else:
        directions = random_directions(base, steer_layer, bias=False)
        mlp, source = CoefficientMLP(base.cfg.d_model, directions.behaviour_ids, config.mlp_hidden), "random"
    base_prompts, thinking_prompts = prompts_for(args.batch)
    for mode in CACHE_MODES:
        phase = f"correction_hybrid_{mode}"
        if over(phase):
            continue
        hybrid_config = HybridConfig(steer_layer=steer_layer, read_layer=read_layer, max_new_tokens=args.hybrid_tokens,
                                     ignore_eos=True, batch_size=args.batch, coefficient_rule="learned",
                                     cache_mode=mode)
        policy = RandomFiringPolicy(args.steer_rate, directions.behaviour_ids, seed=0)
        generated = guarded(phase, lambda c=hybrid_config, p=policy: hybrid_generate(
            base, thinking, base_prompts, thinking_prompts, directions, p, c, coefficient_model=mlp))
        if generated is None:
            continue
        out, seconds, peak = generated
        n = sum(len(ids) for ids in out.token_ids)
        hybrid = {"vectors": source, "tokens": n, "seconds": round(seconds, 2), "tokens_per_s": round(n / seconds, 1),
                  "peak_gib": peak, "steered_fraction": round(sum(out.steered_fractions) / len(out.steered_fractions), 4),
                  "positions_recomputed": out.positions_recomputed}
        for name, reference in (("vs_plain_pair", result.get("plain_pair_tokens_per_s")),
                                ("vs_grid_hybrid", result.get("hybrid", {}).get("tokens_per_s"))):
            if reference:
                hybrid[name] = round(hybrid["tokens_per_s"] / reference, 3)
        result[phase] = hybrid


def collect(base, thinking, args: argparse.Namespace, steer_layer: int, folder: Path,
            guarded: Callable[[str, Callable[[], Any]], Any]) -> Any:
    """Disagreement collection over synthetic traces labelled by sentence index, timed (None: out of memory)."""
    base_prompts, thinking_prompts = prompts_for(args.correction_traces)
    traces = synthetic_traces(thinking_prompts, args.trace_chars, thinking.cfg.model_name)
    framed = [reframe_trace(trace, prompt) for trace, prompt in zip(traces, base_prompts, strict=True)]
    return guarded("correction_collect", lambda: collect_disagreements(
        base, thinking, traces, framed, sentence_index_labels(), DisagreementSettings(layer=steer_layer),
        folder / "disagreements"))


def free(device: torch.device) -> None:
    """Give a finished shape's memory back before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few tokens, any device (CI)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=1000, help="plain generation, per row")
    parser.add_argument("--hybrid-tokens", type=int, default=512, help="hybrid generation, per row")
    parser.add_argument("--reference-tokens", type=int, default=48)
    parser.add_argument("--trace-chars", type=int, default=3000, help="activation traces: reasoning length")
    parser.add_argument("--exact-tokens", type=int, default=24)
    parser.add_argument("--correction-traces", type=int, default=16,
                        help="correction vectors: traces collected (--trace-chars each) and trained on")
    parser.add_argument("--steer-rate", type=float, default=0.12)
    parser.add_argument("--chunk", type=int, default=32, help="HybridConfig.max_candidates_per_chunk")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="phases that would start later are skipped (a started one runs to its end)")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--skip", nargs="+", default=[], choices=PHASES, metavar="PHASE",
                        help=f"phases of each shape not to run, of {', '.join(PHASES)} (correction: all of its own)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.new_tokens, args.hybrid_tokens = 2, 6, 6
        args.reference_tokens, args.trace_chars, args.exact_tokens, args.correction_traces = 4, 300, 6, 4
    device = resolve_device(args.device)
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA device: the GPU check needs one (use --smoke to run it on the CPU)")
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: threads only add waits (10x slower on a loaded CI machine)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    deadline = started + args.budget_s
    timer = Timer(device)
    skipped: list[str] = []
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                              "torch": torch.__version__, "smoke": args.smoke}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        folder = Path(tmp)
        report["exactness"] = exactness(device, folder, args.exact_tokens)
        free(device)
        report["qwen_1.5b"] = check_shape("qwen2", args, device, dtype, folder, timer, deadline, skipped)
        free(device)
        if not args.skip_llama and time.perf_counter() < deadline:
            report["llama_8b"] = check_shape("llama", args, device, dtype, folder, timer, deadline, skipped)
        elif not args.skip_llama:
            skipped.append("llama_8b")
    report["skipped"] = skipped
    report["seconds"] = round(time.perf_counter() - started, 1)
    line = json.dumps(report)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
