"""viewer.html: a run's problems and generations in one offline page, checked as data and in a real
browser (headless Chromium, which `make install` installs: the browser tests skip only when no
Chromium can be found at all)."""

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mechsteer.cli import main
from mechsteer.core.errors import ArtefactError
from mechsteer.experiment.layout import RunPaths
from mechsteer.experiment.viewer import hybrid_generation, read_viewer_data
from mechsteer.hybrid.records import HybridRecord, read_hybrid_records, token_char_ends
from mechsteer.organisms.tokenizer import build_tokenizer

MAX_DEMO_BYTES = 5_000_000  # the bound for the demo's 200 problems
DEMO_PROBLEMS = 200
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def record(**changes) -> HybridRecord:
    fields = dict(problem_id="p", text="ab cd ef", prediction=None, reference="1", correct=False, n_tokens=4,
                  steered_fraction=0.5, agree_fraction=0.5, steered_positions=[1, 3], steered_behaviours=[0, -1],
                  steered_coeffs=[2.0, 1.0], steered_windows=[1, 15], top_latents=[[4], [5], [], [6]],
                  finish_reason="stop", token_ends=[2, 5, 8, 8], disagree_positions=[1, 2])
    return HybridRecord(**{**fields, **changes})


# ------------------------------------------------------------------------------------------
# Without a browser


def test_steered_tokens_are_placed_in_the_text_with_their_steering():
    generation = hybrid_generation(record(), {0: "plan"})
    assert generation.offsets
    first, second = generation.steered
    assert (first.start, first.end, record().text[first.start:first.end]) == (2, 5, " cd")
    assert (first.event, first.coeff, first.window, first.top_latent, first.agreed) == ("plan", 2.0, 1, 5, False)
    # the last token ends the text (an end-of-sequence token has no characters); the bias alone
    assert (second.start, second.end, second.event, second.agreed) == (8, 8, "bias", True)
    assert generation.disagreed == ((1, 2, 5), (2, 5, 8))


def test_a_record_written_before_token_offsets_still_loads_and_lists_its_steered_tokens():
    old = record().to_json()
    del old["token_ends"], old["disagree_positions"]
    loaded = HybridRecord.from_json(old)
    assert loaded.token_ends is None and loaded.disagree_positions is None
    generation = hybrid_generation(loaded, {0: "plan"})
    assert not generation.offsets and generation.disagreed == ()
    assert [(token.position, token.start, token.agreed) for token in generation.steered] == [(1, None, None),
                                                                                             (3, None, None)]
    with pytest.raises(ArtefactError, match=r"lacks \['steered_positions'\]"):
        HybridRecord.from_json({key: value for key, value in old.items() if key != "steered_positions"})


def test_token_ends_follow_the_decoded_text_and_a_stop_string_cut():
    tokenizer = build_tokenizer()
    text = "Day 1: 46 + 8 = 54.\nCheck: 54.\nThe answer is 54.\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    ends = token_char_ends(tokenizer, ids, decoded)
    assert len(ends) == len(ids) and ends[-1] == len(decoded)
    starts = [0, *ends[:-1]]
    assert [decoded[a:b] for a, b in zip(starts, ends, strict=True)] == [
        tokenizer.decode(ids[: i + 1], skip_special_tokens=True)[a:] for i, a in enumerate(starts)]
    cut = decoded[: decoded.index("Check")]  # a stop string cut the text: the tokens past it end at its end
    assert token_char_ends(tokenizer, ids, cut)[-1] == len(cut)
    assert max(token_char_ends(tokenizer, ids, cut)) == len(cut)


def test_a_token_holding_part_of_a_character_ends_where_the_previous_one_did():
    class Bytes:  # a byte-level tokenizer: token i is byte i of the text's UTF-8
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    text = "a→b"  # the arrow is three bytes
    ids = list(text.encode())
    assert token_char_ends(Bytes(), ids, text) == [1, 1, 1, 2, 3]


# ------------------------------------------------------------------------------------------
# A run's page (the short organism run of conftest)


@pytest.mark.slow
def test_a_run_writes_the_viewer_with_every_evaluation_and_report_md_links_it(short_run, tmp_path):
    out, report = short_run
    paths = RunPaths(out)
    assert "[viewer.html](viewer.html)" in paths.report_md.read_text()
    page = paths.viewer.read_text()
    # offline: nothing fetched from anywhere
    for outside in ("http://", "https://", "src=", "<link", "@import", "fetch("):
        assert outside not in page, outside
    # the demo's 200 problems fit the bound (the short run has 50, of the same evaluations but one)
    data = read_viewer_data(paths.viewer)
    assert len(page.encode()) / len(data["problems"]) * DEMO_PROBLEMS <= MAX_DEMO_BYTES
    names = [evaluation["name"] for evaluation in data["evaluations"]]
    assert names == ["base", "thinking", "hybrid", *report["controls"], *report["baselines"]]
    accuracies = {evaluation["name"]: evaluation["accuracy"] for evaluation in data["evaluations"]}
    assert accuracies["hybrid"] == pytest.approx(report["hybrid_accuracy"])
    assert accuracies["base"] == pytest.approx(report["base_accuracy"])
    assert len(data["problems"]) == report["n_eval"]
    for name in names[2:]:
        records = {r.problem_id: r for r in read_hybrid_records(paths.hybrid_results(name))}
        for problem in data["problems"]:
            generation, logged = problem["generations"][name], records[problem["id"]]
            assert [token[0] for token in generation["steered"]] == logged.steered_positions
            assert generation["offsets"] and logged.token_ends is not None
            for position, start, end, *_ in generation["steered"]:  # each mark is its token's text
                assert (start, end) == (logged.token_ends[position - 1] if position else 0, logged.token_ends[position])
    # `mechsteer report DIR` rebuilds the same page from the folder
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    RunPaths(copy).viewer.unlink()
    assert main(["report", str(copy)]) == 0
    assert RunPaths(copy).viewer.read_text() == page


# ------------------------------------------------------------------------------------------
# In a browser


def chromium() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(f"no Chromium found (looked for {', '.join(BROWSERS)} on PATH); `make install` installs Debian's "
                "chromium where apt-get exists, or install it by hand")


@dataclass
class Page:
    """What a page's dumped DOM holds: its state, error text, the steered-token marks by evaluation,
    and the problem rows shown."""

    state: str | None = None
    errors: str = ""
    marks: dict[str, int] = field(default_factory=dict)
    shown_rows: list[str] = field(default_factory=list)
    problem: str | None = None


class DomReader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.page, self.in_error, self.in_heading = Page(), False, False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "html":
            self.page.state = attributes.get("data-state")
        self.in_error = attributes.get("id") == "viewer-error"
        self.in_heading = tag == "h2"
        if tag == "mark" and "steer" in classes:
            name = attributes["data-eval"]
            self.page.marks[name] = self.page.marks.get(name, 0) + 1
        if tag == "tr" and "row" in classes and "hidden" not in attributes:
            self.page.shown_rows.append(attributes["data-id"])

    def handle_data(self, data):
        if self.in_error:
            self.page.errors += data
        if self.in_heading:
            self.page.problem = data

    def handle_endtag(self, tag):
        self.in_error = self.in_heading = False


def open_page(path: Path, fragment: str = "") -> Page:
    """Load the page in headless Chromium and read its DOM after its script ran; anything the page
    writes to the console (uncaught errors included; the page itself logs nothing) is an error too."""
    done = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--dump-dom", f"{path.resolve().as_uri()}{fragment}"],
                          capture_output=True, text=True, timeout=120, check=True)
    reader = DomReader()
    reader.feed(done.stdout)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]  # the page logs nothing
    reader.page.errors += "\n".join(console)
    return reader.page


def screenshot(path: Path, fragment: str, out: Path) -> Path:
    subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1500,950", f"--screenshot={out}", f"{path.resolve().as_uri()}{fragment}"],
                   capture_output=True, timeout=120, check=True)
    return out


@pytest.mark.slow
def test_the_page_renders_in_chromium_with_a_mark_per_steered_token(short_run, tmp_path):
    out, _ = short_run
    paths = RunPaths(out)
    data = read_viewer_data(paths.viewer)
    names = [evaluation["name"] for evaluation in data["evaluations"] if evaluation["kind"] != "plain"]
    logs = {name: {r.problem_id: r for r in read_hybrid_records(paths.hybrid_results(name))} for name in names}
    # for every hybrid evaluation, the problem it steered most in, and one where a steered token has no
    # characters (an end-of-sequence token) if any; every evaluation's marks on those problems
    problems = dict.fromkeys(max(logs[name], key=lambda pid: len(logs[name][pid].steered_positions))
                             for name in names)
    empty = [pid for name in names for pid, logged in logs[name].items() if any(
        logged.token_ends[p] == (logged.token_ends[p - 1] if p else 0) for p in logged.steered_positions)]
    problems.update(dict.fromkeys(empty[:1]))
    assert any(logs["hybrid"][pid].steered_positions for pid in problems)
    for problem_id in problems:
        page = open_page(paths.viewer, f"#problem={problem_id}")
        assert page.state == "ready" and not page.errors.strip(), page.errors
        assert page.problem == problem_id
        assert len(page.shown_rows) == len(data["problems"])
        for name in names:
            assert page.marks.get(name, 0) == len(logs[name][problem_id].steered_positions), (problem_id, name)
    # a filter shows exactly the problems it says
    graded = {problem["id"]: problem["generations"] for problem in data["problems"]}
    wanted = [pid for pid, generations in graded.items()
              if generations["hybrid"]["correct"] and not generations["base"]["correct"]]
    page = open_page(paths.viewer, "#filter=hybrid:right,base:wrong")
    assert page.state == "ready" and page.shown_rows == wanted
    if wanted:
        assert page.problem == wanted[0]
    # a screenshot, kept under the test's tmp path
    shot = screenshot(paths.viewer, f"#problem={next(iter(problems))}", tmp_path / "viewer.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"viewer screenshot: {shot}")


@pytest.mark.slow
def test_the_browser_check_sees_a_script_error_and_a_wrong_address(short_run, tmp_path):
    out, _ = short_run
    broken = tmp_path / "viewer.html"
    page = RunPaths(out).viewer.read_text()
    broken.write_text(page.replace("const EVALS = DATA.evaluations;", "const EVALS = DATA.evaluationz.slice();"))
    seen = open_page(broken)
    assert seen.state == "error" and ("evaluationz" in seen.errors or "undefined" in seen.errors), seen
    seen = open_page(RunPaths(out).viewer, "#problem=no-such-problem")
    assert seen.state == "error" and 'no problem "no-such-problem"' in seen.errors
    seen = open_page(RunPaths(out).viewer, "#filter=hybrid:maybe")
    assert seen.state == "error" and 'filter "hybrid:maybe"' in seen.errors


@pytest.mark.slow
def test_an_older_run_folder_without_token_offsets_still_gets_a_page_with_every_steered_token(short_run, tmp_path):
    out, _ = short_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    results = RunPaths(copy).hybrid_results()
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    for line in lines:
        del line["token_ends"], line["disagree_positions"]
    results.write_text("".join(json.dumps(line) + "\n" for line in lines))
    record = json.loads(RunPaths(copy).stages_file.read_text())
    for entry in record["stages"].values():
        entry.pop("outputs")  # an older folder recorded no file digests either
    RunPaths(copy).stages_file.write_text(json.dumps(record))
    assert main(["report", str(copy)]) == 0
    most = max(lines, key=lambda line: len(line["steered_positions"]))
    page = open_page(RunPaths(copy).viewer, f"#problem={most['problem_id']}")
    assert page.state == "ready" and not page.errors.strip(), page.errors
    assert page.marks["hybrid"] == len(most["steered_positions"]) > 0
