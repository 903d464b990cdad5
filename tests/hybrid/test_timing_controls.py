"""The matched-steering controls' policies: the bias replayed at given positions per problem, and
another policy restricted to the first generated token."""

import pytest
import torch

from mechsteer.core.models import load_model
from mechsteer.hybrid.generator import HybridConfig, hybrid_generate
from mechsteer.hybrid.timing import (
    BIAS_ONLY,
    AlwaysBiasPolicy,
    BiasOnlyPolicy,
    FirstTokenOnlyPolicy,
    PolicyBase,
    PolicyDecision,
    PolicyInput,
    ReplayPolicy,
    SAEArgmaxPolicy,
    TimingOraclePolicy,
    TimingPolicy,
    policy_read,
)
from tests.device_discipline import DeviceDiscipline
from tests.hybrid.test_hybrid import LinearClassifier, make_vectors
from tests.tiny_models import save_tiny_model

CONFIG = HybridConfig(steer_layer=1, read_layer=2, coefficients=(1.0,), windows=(1,), max_new_tokens=8,
                      ignore_eos=True)
# two batches of two problems; "b" is never steered, "c" at its first token and later
POSITIONS = {"a": [0, 3], "b": [], "c": [0, 2, 5, 7], "d": [4]}
BATCHES = [(["a", "b"], ["The cat sat", "A longer prompt, with padding"]), (["c", "d"], ["Hi", "In the"])]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("timing_models")
    return (load_model(str(save_tiny_model(root / "base", "llama", seed=0))),
            load_model(str(save_tiny_model(root / "thinking", "qwen2", seed=1))))


def state(step: int, agree: list[bool]) -> PolicyInput:
    batch = len(agree)
    return PolicyInput(step, torch.randn(batch, 32), torch.zeros(batch, 5), torch.zeros(batch, 5),
                       torch.tensor(agree))


def test_every_policy_declares_what_the_generator_and_the_loop_use():
    oracle = TimingOraclePolicy(lambda text: None, lambda ids: "", {})
    replay = ReplayPolicy(POSITIONS)
    for policy in (AlwaysBiasPolicy(), replay, oracle, BiasOnlyPolicy(oracle), FirstTokenOnlyPolicy(replay)):
        assert isinstance(policy, TimingPolicy), policy
    assert (oracle.reads_text, BiasOnlyPolicy(oracle).reads_text, AlwaysBiasPolicy().reads_text) == (True, True, False)
    problem_ids = BATCHES[0][0]
    FirstTokenOnlyPolicy(replay).bind(problem_ids)  # a wrapper binds the policy it wraps
    assert replay.n_rows == len(problem_ids)
    AlwaysBiasPolicy().bind(problem_ids)  # most policies ignore which problems the rows are


def test_replay_steers_the_bias_exactly_at_each_problems_positions(pair):
    base, thinking = pair
    vectors = make_vectors(base.cfg.d_model)
    policy = ReplayPolicy(POSITIONS)
    mode = DeviceDiscipline()
    for problem_ids, prompts in BATCHES:
        policy.bind(problem_ids)
        with mode:
            out = hybrid_generate(base, thinking, prompts, prompts, vectors, policy, CONFIG)
        for row, problem in enumerate(problem_ids):
            logs = out.token_logs[row]
            assert len(logs) == CONFIG.max_new_tokens
            assert [i for i, log in enumerate(logs) if log.steered] == POSITIONS[problem], problem
            assert all(log.behaviour == BIAS_ONLY for log in logs if log.steered)
    assert mode.faults == []


def test_replay_refuses_unknown_problems_and_an_unbound_batch():
    policy = ReplayPolicy(POSITIONS)
    with pytest.raises(ValueError, match="call bind"):
        policy.decide(state(0, [True, True]))
    with pytest.raises(ValueError, match=r"no positions to replay for problems \['z'\]"):
        policy.bind(["a", "z"])
    policy.bind(["d", "a", "c"])
    assert policy.decide(state(0, [True] * 3)).steer.tolist() == [False, True, True]
    assert policy.decide(state(4, [True] * 3)).steer.tolist() == [True, False, False]
    assert policy.decide(state(6, [True] * 3)).steer.tolist() == [False, False, False]
    with pytest.raises(ValueError, match="bound to 3 rows but the batch has 2"):
        policy.decide(state(0, [True, True]))


def test_first_token_only_keeps_the_wrapped_decision_at_step_zero_and_never_steers_after():
    timing = SAEArgmaxPolicy(LinearClassifier(32, 4), behaviour_ids=[1, 2])
    policy = FirstTokenOnlyPolicy(timing)
    first, wrapped = policy.decide(state(0, [False, True, False])), timing.decide(state(0, [False, True, False]))
    assert first.steer.tolist() == [True, False, True]
    assert set(first.behaviour.tolist()) <= {1, 2} and first.latent_ids is not None
    later = policy.decide(state(1, [False, False, False]))
    assert later.steer.tolist() == [False, False, False] and later.latent_ids is not None
    assert wrapped.steer.tolist() == first.steer.tolist()


def test_first_token_only_in_the_hybrid(pair):
    base, thinking = pair
    prompts = BATCHES[0][1]
    mode = DeviceDiscipline()
    with mode:
        out = hybrid_generate(base, thinking, prompts, prompts, make_vectors(base.cfg.d_model),
                              FirstTokenOnlyPolicy(AlwaysBiasPolicy()), CONFIG)
    assert mode.faults == []
    for logs in out.token_logs:
        assert [log.steered for log in logs] == [True] + [False] * (CONFIG.max_new_tokens - 1)


def test_oracle_timing_steers_where_the_oracle_names_a_behaviour_on_the_text_so_far(pair):
    base, thinking = pair
    vectors = make_vectors(base.cfg.d_model)
    seen: list[str] = []

    def oracle(text: str) -> str | None:
        # steer at the start and whenever the text so far has an odd number of tokens
        seen.append(text)
        n_tokens = len(base.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
        if n_tokens == 0:
            return "start"
        return "odd" if n_tokens % 2 == 1 else ("unknown" if n_tokens == 4 else None)

    def decode(ids: list[int]) -> str:
        return base.tokenizer.decode(ids, skip_special_tokens=True)

    behaviour_of_title = {"start": vectors.behaviour_ids[0], "odd": vectors.behaviour_ids[1]}
    policy = TimingOraclePolicy(oracle, decode, behaviour_of_title)
    mode = DeviceDiscipline()
    with mode:
        out = hybrid_generate(base, thinking, ["The cat sat", "Hi"], ["The cat sat", "Hi"], vectors, policy, CONFIG)
    assert mode.faults == []
    for row in range(2):
        ids = out.token_ids[row]
        expected = {}
        for step in range(len(ids)):
            title = oracle(decode(ids[:step]))
            if title in behaviour_of_title:  # "unknown" has no direction: not steered
                expected[step] = behaviour_of_title[title]
        steered = {i: log.behaviour for i, log in enumerate(out.token_logs[row]) if log.steered}
        assert steered == expected and 0 in steered
    assert seen and all(isinstance(text, str) for text in seen)


def test_oracle_timing_needs_the_generated_text():
    policy = TimingOraclePolicy(lambda text: "x", lambda ids: "", {"x": 1})
    with pytest.raises(ValueError, match="reads the generated text"):
        policy.decide(state(0, [True]))
    decision = policy.decide(PolicyInput(0, torch.randn(2, 32), torch.zeros(2, 5), torch.zeros(2, 5),
                                         torch.tensor([True, False]), generated=[[], [3]]))
    assert decision.steer.tolist() == [True, True] and decision.behaviour.tolist() == [1, 1]


class _Recording(PolicyBase):
    """Never steers; records the activation it is given at each step."""

    def __init__(self, read: str):
        self.read, self.name, self.seen = read, "never", []

    def decide(self, state: PolicyInput) -> PolicyDecision:
        self.seen.append(state.thinking_acts.clone())
        batch, device = state.agree.shape[0], state.agree.device
        return PolicyDecision(steer=torch.zeros(batch, dtype=torch.bool, device=device),
                              behaviour=torch.full((batch,), BIAS_ONLY, dtype=torch.long, device=device))


@pytest.fixture(scope="module")
def organism_pair():
    # one tokenizer for both: the hybrid's shared-vocabulary path
    return load_model("organism-v3-base"), load_model("organism-v3-thinking")


@pytest.mark.parametrize("which", ["pair", "organism_pair"])
def test_next_token_read_is_the_thinking_models_activation_at_its_own_greedy_next_token(which, request):
    base, thinking = request.getfixturevalue(which)
    vectors = make_vectors(base.cfg.d_model)
    prompts = (["The cat sat", "A longer prompt, with padding"] if which == "pair" else
               ["Q: Ann has 38 pens. Each day Ann buys 9. How many after 2 days?\nA:\n", "Q: Ben has 12 cards.\nA:\n"])
    last, ahead = _Recording("last_token"), _Recording("next_token")
    mode = DeviceDiscipline()
    out_last = hybrid_generate(base, thinking, prompts, prompts, vectors, last, CONFIG)
    with mode:
        out_ahead = hybrid_generate(base, thinking, prompts, prompts, vectors, ahead, CONFIG)
    assert mode.faults == []
    # the extra forward leaves the generation exactly as it was
    assert out_ahead.token_ids == out_last.token_ids and out_ahead.texts == out_last.texts
    hook = f"blocks.{CONFIG.read_layer}.hook_resid_post"
    for row, prompt in enumerate(prompts):
        ids = thinking.tokenizer(prompt, return_tensors="pt")["input_ids"]
        for step, generated in enumerate(out_last.token_ids[row][: len(ahead.seen)]):
            with torch.no_grad():
                logits, cache = thinking.run_with_cache(ids, names_filter=hook)
                assert torch.allclose(last.seen[step][row], cache[hook][0, -1], atol=1e-4)
                greedy = logits[0, -1].argmax().view(1, 1)
                _, cache = thinking.run_with_cache(torch.cat([ids, greedy], dim=1), names_filter=hook)
            assert torch.allclose(ahead.seen[step][row], cache[hook][0, -1], atol=1e-4), (row, step)
            assert not torch.allclose(ahead.seen[step][row], last.seen[step][row])
            ids = torch.cat([ids, torch.tensor([[generated]])], dim=1)


def test_wrapped_policies_report_the_read_of_the_policy_they_wrap():
    timing = SAEArgmaxPolicy(LinearClassifier(32, 4), behaviour_ids=[1, 2], read="next_token")
    assert policy_read(timing) == "next_token" == policy_read(FirstTokenOnlyPolicy(timing))
    assert policy_read(BiasOnlyPolicy(timing)) == "next_token"
    assert policy_read(AlwaysBiasPolicy()) == "last_token"
    with pytest.raises(ValueError, match="expected last_token or next_token"):
        policy_read(_Recording("middle"))
