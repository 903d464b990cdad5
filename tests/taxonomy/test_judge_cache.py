"""The HTTP judge's cache keeps only answers that parse (issue 19): a misbehaving server's junk is
asked again once the server is fixed, never replayed, and a flag clears the cache."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mechsteer.cli import main
from mechsteer.taxonomy.judge.http import (
    ENV_API_KEY,
    ENV_MODEL,
    ENV_OPENAI_API_KEY,
    ENV_OPENAI_URL,
    ENV_URL,
)
from mechsteer.taxonomy.judge.prompts import (
    answer_has_shape,
    consistency_messages,
    pair_similarity_messages,
)
from mechsteer.taxonomy.judge.spec import JUDGE_CACHE_DIR, clear_judge_cache
from tests.taxonomy.test_judge import ChatServer, make_judge


@pytest.fixture
def server() -> Iterator[ChatServer]:
    chat_server = ChatServer()
    yield chat_server
    chat_server.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_URL, ENV_MODEL, ENV_API_KEY, ENV_OPENAI_URL, ENV_OPENAI_API_KEY):
        monkeypatch.delenv(name, raising=False)


QUESTION = consistency_messages("plan", "states a plan", "Plan: add 4 for 3 days.")


def test_answers_parse_by_the_task_of_their_prompt():
    assert answer_has_shape(QUESTION, "Yes.") is True
    assert answer_has_shape(QUESTION, "<|endoftext|>") is False
    similarity = pair_similarity_messages("a", "b", "c", "d")
    assert answer_has_shape(similarity, "7/10") is True and answer_has_shape(similarity, "similar") is False
    assert answer_has_shape([{"role": "user", "content": "free text"}], "anything") is None  # not a judge prompt


@pytest.mark.parametrize("question, answer, cached", [
    (QUESTION, "Yes.", True),
    (QUESTION, "**no**", True),
    (QUESTION, "Answer: yes", True),
    (QUESTION, "Service unavailable: no healthy upstream", False),  # reads as "no"; it is no verdict
    (QUESTION, "I cannot say yes to that without more context.", False),
    (pair_similarity_messages("a", "b", "c", "d"), "7", True),
    (pair_similarity_messages("a", "b", "c", "d"), "7/10", True),
    (pair_similarity_messages("a", "b", "c", "d"), "Score: 3.5", True),
    (pair_similarity_messages("a", "b", "c", "d"), "Error 5: upstream connect error", False),  # reads as 5
    (pair_similarity_messages("a", "b", "c", "d"), "11", False),
])
def test_only_answers_of_the_questions_shape_are_cached(server: ChatServer, tmp_path: Path, question, answer,
                                                        cached) -> None:
    server.responder = lambda messages: answer
    assert make_judge(server, cache_dir=tmp_path).complete(question) == answer
    assert bool(list(tmp_path.rglob("*.json"))) is cached
    make_judge(server, cache_dir=tmp_path).complete(question)
    assert server.count == (1 if cached else 2)  # a wrong shape is asked again


def test_unparsable_answers_are_not_cached_and_are_asked_again(server: ChatServer, tmp_path: Path) -> None:
    server.responder = lambda messages: "<|endoftext|>"  # a misbehaving server
    assert make_judge(server, cache_dir=tmp_path).complete(QUESTION) == "<|endoftext|>"
    assert not list(tmp_path.rglob("*.json"))  # junk is not kept
    server.responder = lambda messages: "yes"  # the server is fixed
    assert make_judge(server, cache_dir=tmp_path).complete(QUESTION) == "yes"
    assert server.count == 2
    rerun = make_judge(server, cache_dir=tmp_path)
    assert rerun.complete(QUESTION) == "yes" and rerun.n_cache_hits == 1 and server.count == 2


def test_junk_cached_by_an_older_version_is_not_replayed(server: ChatServer, tmp_path: Path) -> None:
    judge = make_judge(server, cache_dir=tmp_path)
    server.responder = lambda messages: "yes"
    judge.complete(QUESTION)
    [cached] = list(tmp_path.rglob("*.json"))
    record = json.loads(cached.read_text())
    cached.write_text(json.dumps({**record, "response": "???"}))  # what an older version kept
    assert make_judge(server, cache_dir=tmp_path).complete(QUESTION) == "yes"
    assert server.count == 2 and json.loads(cached.read_text())["response"] == "yes"


def test_clear_judge_cache_removes_the_folder(tmp_path: Path) -> None:
    cache = tmp_path / JUDGE_CACHE_DIR / "ab"
    cache.mkdir(parents=True)
    (cache / "abc.json").write_text("{}")
    assert clear_judge_cache(tmp_path) == 1 and not (tmp_path / JUDGE_CACHE_DIR).exists()
    assert clear_judge_cache(tmp_path) == 0


def test_the_taxonomy_command_clears_the_cache_with_a_flag(tmp_path: Path, capsys) -> None:
    cache = tmp_path / "taxonomy" / JUDGE_CACHE_DIR / "ab"
    cache.mkdir(parents=True)
    (cache / "abc.json").write_text("{}")
    # The activations folder is missing: the command stops, but after clearing? No: checks come first.
    code = main(["taxonomy", "--activations", str(tmp_path / "none"), "--out", str(tmp_path / "taxonomy"),
                 "--clear-judge-cache"])
    assert code == 1 and (cache / "abc.json").exists()  # a refused command changes nothing
