"""The per-token loops on a GPU, checked on the CPU: device discipline (no tensor created without a
device, no host/device mix, one small host transfer per step), bf16 end to end, the memory bound of
a steered step, and random-weight pairs of the paper's architectures with R1-style tokenizers."""

from pathlib import Path

import pytest
import torch

from mechsteer.core.models import HOST, load_model
from mechsteer.core.vocab import tokenizers_compatible
from mechsteer.data.prompts import render_prompt
from mechsteer.hybrid.generator import HybridConfig, hybrid_generate
from mechsteer.hybrid.reference import reference_hybrid_generate
from mechsteer.hybrid.timing import (
    AlwaysBiasPolicy,
    NeverPolicy,
    PolicyBase,
    PolicyDecision,
    PolicyInput,
    SAEArgmaxPolicy,
)
from mechsteer.interventions.generation import generate, tokenize_prompts
from mechsteer.taxonomy.sae import SAEConfig, TopKSAE
from tests.device_discipline import DeviceDiscipline
from tests.hybrid.test_hybrid import LinearClassifier, make_vectors
from tests.tiny_models import save_real_pair, save_tiny_model

PROMPTS = ["The cat sat", "A much longer prompt, with some padding", "Hi"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_models")
    return {
        "base": load_model(str(save_tiny_model(root / "base", "llama", seed=0))),
        "thinking": load_model(str(save_tiny_model(root / "thinking", "qwen2", seed=1))),
        "thinking_bpe": load_model(str(save_tiny_model(root / "bpe", "llama", seed=2, extra_merges=True))),
        "base_bf16": load_model(str(root / "base"), dtype="bfloat16"),
        "thinking_bf16": load_model(str(root / "thinking"), dtype="bfloat16"),
    }


class OneRowPerStep(PolicyBase):
    """Steers row ``step % batch`` only (so that other rows always run on), with behaviour 1."""

    name = "one_row"

    def decide(self, state: PolicyInput) -> PolicyDecision:
        batch, device = state.agree.shape[0], state.agree.device
        rows = torch.arange(batch, device=device)
        return PolicyDecision(steer=rows == state.step % batch,
                              behaviour=torch.ones(batch, dtype=torch.long, device=device))


def sae_policy(d_model: int) -> SAEArgmaxPolicy:
    sae = TopKSAE(SAEConfig(d_in=d_model, n_latents=4, k=2))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(4, d_model, generator=torch.Generator().manual_seed(0)))
    return SAEArgmaxPolicy(sae, behaviour_ids=[0, 1, 2, 3])


def test_discipline_catches_what_it_is_for():
    """The check itself must fail on the faults of the issue: a CPU mask mixed with device
    tensors, a tensor without a device, per-row syncs and a full-vocabulary copy to the host."""
    mode = DeviceDiscipline(modules=(Path(__file__),))
    logits = torch.randn(3, 50) * 1.0  # a "device" tensor: not made on the host on purpose
    with mode:
        updated = torch.tensor([True, False, True])
        torch.where(torch.tensor([True, False, True], device=HOST)[:, None], logits, logits)
        _ = [float(value) for value in logits.max(dim=-1).values]
        logits.float().cpu()
        fine = torch.tensor([1, 2], device=HOST).sum().tolist()  # host-only work is free
    assert updated.shape == (3,) and fine == 3
    assert any("torch.tensor without a device" in fault for fault in mode.faults)
    assert any("where mixes host tensors" in fault for fault in mode.faults)
    assert mode.host_transfers() == 4 and max(t.numel for t in mode.transfers) == 150


@pytest.mark.parametrize("policy_name", ["one_row", "sae"])
def test_hybrid_loop_is_device_clean_with_one_transfer_per_step(models, policy_name):
    base, thinking = models["base"], models["thinking"]
    policy = OneRowPerStep() if policy_name == "one_row" else sae_policy(thinking.cfg.d_model)
    config = HybridConfig(steer_layer=1, read_layer=2, coefficients=(0.5, 2.0), windows=(1, 3), max_new_tokens=10,
                          ignore_eos=True)
    mode = DeviceDiscipline()
    with mode:
        out = hybrid_generate(base, thinking, PROMPTS, PROMPTS, make_vectors(base.cfg.d_model), policy, config)
    assert mode.faults == []
    steps = max(len(ids) for ids in out.token_ids)
    steered = sum(log.steered for logs in out.token_logs for log in logs)
    assert steered > 0
    if policy_name == "one_row":  # another row always runs on: the steered token joins the next step's transfer
        assert mode.host_transfers() <= steps + 1, [t.where for t in mode.transfers]
    else:  # a step where every running row is steered learns their tokens at once (one more transfer)
        assert mode.host_transfers() <= 2 * steps + 1
    # no full-vocabulary logits (vocab 99) or activations travel: per row a few ids, flags and top latents
    assert max(t.numel for t in mode.transfers) <= len(PROMPTS) * 12


def test_cross_tokenizer_loop_is_device_clean(models):
    base, thinking = models["base"], models["thinking_bpe"]
    config = HybridConfig(steer_layer=1, read_layer=1, coefficients=(0.5, 2.0), windows=(1, 3), max_new_tokens=8)
    mode = DeviceDiscipline()
    with mode:
        out = hybrid_generate(base, thinking, ["the rather", "in the"], ["the rather", "in the"],
                              make_vectors(base.cfg.d_model), OneRowPerStep(), config)
    assert mode.faults == []
    steps = max(len(ids) for ids in out.token_ids)
    assert mode.host_transfers() <= 2 * steps + 1  # the text must be re-encoded at once when a row was steered


@pytest.mark.parametrize("sample", [False, True])
def test_plain_generation_is_device_clean_with_one_transfer_per_step(models, sample):
    mode = DeviceDiscipline()
    with mode:
        out = generate(models["base"], PROMPTS, max_new_tokens=9, do_sample=sample, top_p=0.9, seed=3)
    assert mode.faults == []
    assert mode.host_transfers() == max(len(ids) for ids in out.token_ids)
    assert max(t.numel for t in mode.transfers) <= len(PROMPTS)


def test_generation_drops_finished_rows_with_identical_outputs(models):
    """A row that stops early leaves the batch; the others' tokens are those they get alone."""
    model = models["base"]
    prompts = PROMPTS + ["Q", "Another one"]
    first = generate(model, prompts, max_new_tokens=12)
    eos = first.token_ids[0][2]  # stop one row early on a token it really generates
    batched = generate(model, prompts, max_new_tokens=12, eos_token_id=eos)
    alone = [generate(model, [prompt], max_new_tokens=12, eos_token_id=eos).token_ids[0] for prompt in prompts]
    assert batched.token_ids == alone
    assert batched.finish_reasons[0] == "eos" and len(batched.token_ids[0]) == 3
    sampled = generate(model, prompts, max_new_tokens=12, eos_token_id=eos, do_sample=True, seed=5)
    again = generate(model, prompts, max_new_tokens=12, eos_token_id=eos, do_sample=True, seed=5)
    assert sampled.token_ids == again.token_ids


def test_bf16_end_to_end(models):
    base, thinking = models["base_bf16"], models["thinking_bf16"]
    assert next(base.parameters()).dtype == torch.bfloat16
    config = HybridConfig(steer_layer=1, read_layer=1, coefficients=(0.5, 2.0), windows=(0, 1, 3), max_new_tokens=8)
    vectors = make_vectors(base.cfg.d_model)
    never = hybrid_generate(base, thinking, PROMPTS, PROMPTS, vectors, NeverPolicy(), config)
    plain = generate(base, PROMPTS, max_new_tokens=8)
    assert never.token_ids == plain.token_ids  # the same cached computation in bf16
    mode = DeviceDiscipline()
    with mode:
        steered = hybrid_generate(base, thinking, PROMPTS, PROMPTS, vectors, sae_policy(thinking.cfg.d_model), config)
    assert mode.faults == []
    assert all(len(ids) > 0 for ids in steered.token_ids)
    assert any(log.steered for logs in steered.token_logs for log in logs)
    assert all(isinstance(v, float) for logs in steered.token_logs for log in logs for v in log.latent_values)


def test_steered_step_cost_is_bounded(models):
    """Each window is recomputed only as wide as it is, and at most max_candidates_per_chunk
    forked sequences run at once; the chunking does not change a token."""
    base, thinking = models["base"], models["thinking"]
    windows, coefficients = (1, 3, 50), (0.5, 2.0)
    outputs = {}
    for chunk in (32, 4):
        config = HybridConfig(steer_layer=1, read_layer=1, coefficients=coefficients, windows=windows,
                              max_new_tokens=10, ignore_eos=True, max_candidates_per_chunk=chunk)
        outputs[chunk] = hybrid_generate(base, thinking, PROMPTS, PROMPTS, make_vectors(base.cfg.d_model),
                                         AlwaysBiasPolicy(), config)
    assert outputs[4].token_ids == outputs[32].token_ids
    assert outputs[4].largest_fork <= 4 < outputs[32].largest_fork == len(PROMPTS) * len(coefficients)
    out = outputs[32]
    steered_steps = sum(log.steered for logs in out.token_logs for log in logs)
    longest = max(len(ids) for ids in tokenize_prompts(base, PROMPTS)) + 10  # the padded length, at most
    bound = steered_steps * len(coefficients) * sum(min(window, longest) for window in windows)
    assert 0 < out.positions_recomputed <= bound
    # what recomputing the widest window for every candidate would have cost
    assert out.positions_recomputed < steered_steps * len(coefficients) * len(windows) * min(max(windows), longest - 10)


def test_window_all_matches_the_oracle(models):
    base, thinking = models["base"], models["thinking"]
    config = HybridConfig(steer_layer=1, read_layer=1, coefficients=(0.5, 2.0), windows=(0, 2), max_new_tokens=8)
    policy = SAEArgmaxPolicy(LinearClassifier(thinking.cfg.d_model, 4))
    vectors = make_vectors(base.cfg.d_model)
    out = hybrid_generate(base, thinking, PROMPTS, PROMPTS, vectors, policy, config)
    assert any(log.window == 0 for logs in out.token_logs for log in logs if log.steered)
    for row, prompt in enumerate(PROMPTS):
        expected, steered = reference_hybrid_generate(base, thinking, prompt, prompt, vectors, policy, config,
                                                      shared_tokenizer=True)
        assert out.token_ids[row] == expected
        assert [log.steered for log in out.token_logs[row]] == steered


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def real_pair(request, tmp_path_factory):
    base_dir, thinking_dir = save_real_pair(tmp_path_factory.mktemp(f"real_{request.param}"), request.param)
    return request.param, load_model(str(base_dir)), load_model(str(thinking_dir))


def test_real_architecture_pair_shares_ids_and_has_one_bos(real_pair):
    arch, base, thinking = real_pair
    assert base.cfg.architecture == ("Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM")
    # they differ in added and special tokens only, as Qwen2.5 / Llama 3.1 and their R1 distills do
    assert set(base.tokenizer.get_vocab()) != set(thinking.tokenizer.get_vocab())
    assert tokenizers_compatible(base.tokenizer, thinking.tokenizer)
    prompt = render_prompt("thinking_chat", "What is 2 + 3?", thinking.tokenizer)
    assert prompt.startswith(thinking.tokenizer.bos_token)  # the chat template writes the BOS
    ids = tokenize_prompts(thinking, [prompt])[0]
    assert ids[0] == thinking.tokenizer.bos_token_id and ids.count(thinking.tokenizer.bos_token_id) == 1


def test_real_architecture_pair_shared_ids_give_the_reencoding_path_tokens(real_pair):
    _, base, thinking = real_pair
    base_prompts = [render_prompt("base_paper", q) for q in ("What is 2 + 3?", "Name a prime.")]
    thinking_prompts = [render_prompt("thinking_chat", q, thinking.tokenizer) for q in ("What is 2 + 3?", "Name a prime.")]
    config = HybridConfig(steer_layer=1, read_layer=2, coefficients=(0.5, 4.0), windows=(1, 4), max_new_tokens=10,
                          ignore_eos=True)
    policy = SAEArgmaxPolicy(LinearClassifier(thinking.cfg.d_model, 4))
    vectors = make_vectors(base.cfg.d_model)
    shared = hybrid_generate(base, thinking, base_prompts, thinking_prompts, vectors, policy, config)
    reencoded = hybrid_generate(base, thinking, base_prompts, thinking_prompts, vectors, policy, config,
                                shared_tokenizer=False)
    added = set(base.tokenizer.added_tokens_decoder)
    # the test means ordinary text: no row emitted an added token, whose handling differs by design
    assert not any(token in added for ids in shared.token_ids for token in ids)
    assert shared.token_ids == reencoded.token_ids
    assert [[log.steered for log in logs] for logs in shared.token_logs] == \
        [[log.steered for log in logs] for logs in reencoded.token_logs]
    assert any(log.steered for logs in shared.token_logs for log in logs)
    for row in range(2):
        expected, _ = reference_hybrid_generate(base, thinking, base_prompts[row], thinking_prompts[row], vectors,
                                                policy, config, shared_tokenizer=True)
        assert shared.token_ids[row] == expected


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_real_vocabulary_tokenizers_of_the_gpu_check_share_ids(arch, tmp_path):
    """bench/gpu_check.py's full-size tokenizers (the real vocabulary sizes): the shared-id path."""
    from transformers import AutoTokenizer

    from mechsteer.core.vocab import shared_id_map
    from tests.tiny_models import REAL_CONFIGS, REAL_PAIRS, real_pair_tokenizers

    vocab_size = REAL_CONFIGS[REAL_PAIRS[arch][0]]["vocab_size"]
    loaded = []
    for name, tokenizer in zip(("base", "thinking"), real_pair_tokenizers(arch, vocab_size), strict=True):
        tokenizer.save_pretrained(tmp_path / name)
        loaded.append(AutoTokenizer.from_pretrained(tmp_path / name))
    base, thinking = loaded
    assert len(base) <= vocab_size and len(thinking) <= vocab_size
    assert tokenizers_compatible(base, thinking)
    mapping = shared_id_map(base, thinking, vocab_size, vocab_size)
    assert mapping[:1000] == list(range(1000)) and mapping[base.eos_token_id] == -1  # base EOS: not R1's

