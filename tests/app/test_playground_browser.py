"""The playground page at GET /, driven in Debian's chromium (headless) against a real `lyrics serve`.

Needs /usr/bin/chromium (`apt-get install chromium`): without it these tests skip on a developer
machine and fail in CI (CI=true), where .ci/run installs it.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from api_helpers import serving

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing: CI must run the browser tests (.ci/run installs chromium with apt)")
        pytest.skip("install Debian chromium (apt-get install chromium) to run the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(browser, model_dir, tmp_path_factory):
    """`lyrics serve` on the small test models, on a free loopback port."""
    log = tmp_path_factory.mktemp("playground") / "server.log"
    with serving(model_dir, log, LYRICS_MAX_NEW_CHARS="100000", LYRICS_DEFAULT_MODEL="gru") as (base_url, _):
        yield base_url


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server + "/")
    page.wait_for_selector("#model[data-loaded='true']")
    yield page
    context.close()


def fill_generation(page, prefix: str, max_chars: int, temperature: float, seed: int | None = None) -> None:
    page.fill("#prefix", prefix)
    page.fill("#max-chars", str(max_chars))
    page.fill("#temperature", str(temperature))
    page.fill("#top-p", "1")
    page.fill("#seed", "" if seed is None else str(seed))


def wait_state(page, state: str) -> None:
    page.wait_for_selector(f"#output[data-state='{state}']")


def test_the_page_loads_and_lists_the_models(page):
    assert page.title() == "Lyrics RNN playground"
    options = page.eval_on_selector_all("#model option", "os => os.map(o => [o.value, o.textContent, o.selected])")
    assert [o[0] for o in options] == ["gru", "rnn"]
    assert options[0][2] and "GRU" in options[0][1] and "val perplexity" in options[0][1]
    assert "RNN" in options[1][1]


def test_generate_streams_the_greedy_continuation(page, server):
    fill_generation(page, "分开", 40, 0)
    page.click("#generate")
    wait_state(page, "done")
    text = page.inner_text("#output")
    expected = httpx.post(server + "/generate", json={"prefix": "分开", "max_chars": 40, "model": "gru",
                                                      "temperature": 0}, timeout=30).json()["text"]
    assert text.startswith("分开") and text == expected
    assert page.is_enabled("#generate") and page.is_disabled("#stop")
    assert page.inner_text("#error") == ""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)


def test_the_page_fits_a_phone(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server + "/")
        page.wait_for_selector("#model[data-loaded='true']")
        fill_generation(page, "你说", 60, 0)
        page.click("#generate")
        wait_state(page, "done")
        assert page.inner_text("#output").startswith("你说")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "playground-phone.png"), full_page=True)
    finally:
        context.close()


def test_stop_cancels_a_long_generation(page):
    # 50000 characters take several seconds on a CPU (5000 take under one): Stop lands well before the end
    fill_generation(page, "分开", 50_000, 1, seed=1)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#output').textContent.length > 5")
    page.click("#stop")
    wait_state(page, "stopped")
    assert page.is_enabled("#generate") and page.is_disabled("#stop")
    assert len(page.inner_text("#output")) < 2 + 50_000
    assert page.get_attribute("#output", "data-finish-reason") is None  # no final event arrived


def test_unknown_characters_are_named(page):
    fill_generation(page, "分开☃", 20, 0)
    page.click("#generate")
    wait_state(page, "error")
    message = page.inner_text("#error")
    assert page.is_visible("#error") and "☃" in message and "nknown" in message


def test_scoring_a_text_shows_its_perplexity(page):
    page.fill("#score-text", "分开的爱 我不要")
    page.click("#score")
    page.wait_for_selector("#score-result[data-perplexity]")
    assert float(page.get_attribute("#score-result", "data-perplexity")) > 0
    assert "Perplexity" in page.inner_text("#score-result") and "7 characters" in page.inner_text("#score-result")


def test_scoring_shows_a_per_character_heat_map_and_the_surprising_spans(page, server):
    text = "分开的爱 我不要\n你说"
    page.fill("#score-text", text)
    page.click("#score")
    page.wait_for_selector("#score-result[data-perplexity]")
    expected = httpx.post(server + "/perplexity", json={"text": text, "model": "gru", "per_char": True,
                                                        "top_spans": 3, "span_chars": 2}, timeout=30).json()
    cells = page.eval_on_selector_all(
        "#heatmap .char", "cs => cs.map(c => [c.textContent, c.dataset.nll, c.classList.contains('unscored'), "
                          "getComputedStyle(c).backgroundColor, c.title])")
    assert "".join(c[0] for c in cells) == text
    assert cells[0][1] == "" and cells[0][2] and "first character" in cells[0][4]
    shown = [float(c[1]) for c in cells[1:]]
    assert shown == pytest.approx([c["nll"] for c in expected["per_char"][1:]], rel=1e-6)
    assert "nats" in cells[1][4] and "bits" in cells[1][4]
    # the most surprising character is drawn darker than the least surprising one
    alpha = {c[1]: float(c[3].rsplit(",", 1)[1].rstrip(")")) for c in cells[1:]}
    assert alpha[cells[1 + shown.index(max(shown))][1]] > alpha[cells[1 + shown.index(min(shown))][1]]
    spans = page.eval_on_selector_all("#surprising li", "ls => ls.map(l => l.textContent)")
    assert len(spans) == len(expected["surprising_spans"]) == 3
    assert spans[0].startswith(f"“{expected['surprising_spans'][0]['text']}”")
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#score-title").locator("..").screenshot(path=str(ARTIFACTS / "playground-heatmap.png"))


def test_compare_runs_every_model_side_by_side(page, server):
    fill_generation(page, "分开", 30, 0)
    page.fill("#score-text", "分开的爱 我不要")
    page.click("#compare")
    page.wait_for_selector("#compare-results[data-state='done']")
    expected = httpx.post(server + "/compare", json={"prefix": "分开", "max_chars": 30, "temperature": 0,
                                                     "top_p": 1, "text": "分开的爱 我不要"}, timeout=30).json()
    cards = page.eval_on_selector_all(
        ".compare-card", "cs => cs.map(c => ({model: c.dataset.model, text: c.querySelector('.compare-text')"
                         ".textContent, ppl: c.querySelector('.perplexity').dataset.perplexity, "
                         "ms: c.querySelector('.latency').dataset.latencyMs, all: c.textContent, "
                         "top: c.getBoundingClientRect().top}))")
    assert [c["model"] for c in cards] == [r["model"] for r in expected["results"]] == ["gru", "rnn"]
    for card, result in zip(cards, expected["results"], strict=True):
        assert card["text"] == result["text"]  # greedy: the same text as the API's
        assert float(card["ppl"]) == pytest.approx(result["score"]["perplexity"], rel=1e-6)
        assert float(card["ms"]) > 0
        assert "Val perplexity" in card["all"] and result["provenance"]["corpus_sha256"][:12] in card["all"]
    assert cards[0]["top"] == cards[1]["top"]  # side by side on a wide screen
    assert "greedy" in page.inner_text("#compare-status")
    assert page.is_enabled("#compare") and page.inner_text("#compare-error") == ""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-compare.png"), full_page=True)


def test_compare_names_unknown_characters(page):
    fill_generation(page, "分开☃", 10, 0)
    page.click("#compare")
    page.wait_for_selector("#compare-results[data-state='error']", state="attached")
    message = page.inner_text("#compare-error")
    assert page.is_visible("#compare-error") and "☃" in message and "model gru" in message
