"""End to end in headless Chromium: an invited rater opens their link and votes with clicks and keys,
hostile model output shows as text and runs nothing, the votes land in SQLite and the results reflect them.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them). Writes a screenshot to the
test's tmp dir, and to bench/results/humaneval_screenshot.png when SMALLSCALE_SAVE_SCREENSHOT=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smallscale.humaneval.cli import humaneval_app
from smallscale.humaneval.loadcheck import start_server
from smallscale.humaneval.store import read_votes

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
HOSTILE = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"><b>bold?</b>'
PROMPTS = ["The lighthouse keeper climbed the stairs and", "In the morning the market square was"]
PAGE_STATE = "const p = document.getElementById('progress'); return [document.readyState, p && p.textContent];"
CONTINUATIONS = {
    "run-a": "saw the storm coming over the grey water, so he lit the great lamp early.",
    "run-b": "the the the stairs stairs were were long long long.",
    "run-c": f"printed {HOSTILE} and then stopped.",
}


@pytest.fixture
def study(tmp_path: Path) -> Path:
    for system, continuation in CONTINUATIONS.items():
        path = tmp_path / "study" / "runs" / system / "eval" / "samples.jsonl"
        path.parent.mkdir(parents=True)
        rows = [{"prompt": f"{p} {HOSTILE}", "continuation": continuation, "reference": "", "settings": {}} for p in PROMPTS]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return tmp_path / "study"


@pytest.fixture
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,860"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))  # local driver: no download
    yield driver
    driver.quit()


def test_a_rater_votes_with_clicks_and_keys_and_nothing_hostile_runs(study, browser, tmp_path):
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def progress_is(done: int) -> None:
        # wait for the next page to be fully loaded (its script too); while it loads, the driver may
        # raise about nodes of the old page, which the wait ignores
        WebDriverWait(browser, 10, ignored_exceptions=(WebDriverException,)).until(
            lambda d: d.execute_script(PAGE_STATE) == ["complete", f"{done} of 6"]
        )
        # the hostile markup is on the page as text, and neither its script nor its handler ran
        assert HOSTILE in browser.find_element(By.ID, "prompt").text
        assert browser.find_elements(By.CSS_SELECTOR, ".text *") == []
        assert browser.execute_script("return window.__xss === undefined") is True

    def press(keys: str) -> None:
        ActionChains(browser).send_keys(keys).perform()

    db = study / "human_eval.sqlite"
    proc, url = start_server([study], db)
    try:
        browser.get(url + "/")
        assert "ask the study owner for a link" in browser.find_element(By.ID, "message").text
        port = url.rsplit(":", 1)[1]
        invite = CliRunner().invoke(humaneval_app, ["invite", "alice", str(study), "--port", port])
        assert invite.exit_code == 0, invite.output
        (link,) = re.findall(r"http://\S+/r/\S+", invite.output)
        browser.get(link)
        progress_is(0)
        assert browser.current_url == url + "/rate"  # the token is gone from the address bar
        sides = browser.find_element(By.ID, "text-a").text + browser.find_element(By.ID, "text-b").text
        assert "run-c" not in sides  # systems are not named on the page
        browser.save_screenshot(str(tmp_path / "humaneval_screenshot.png"))

        browser.find_element(By.ID, "answer-a").click()  # vote 1: click
        progress_is(1)
        press("2")  # vote 2: B better by key
        progress_is(2)
        browser.find_element(By.ID, "reason").send_keys("a tidy bit better", Keys.ENTER)  # letters and Enter: no vote
        assert browser.find_element(By.ID, "progress").text == "2 of 6"
        press(Keys.ESCAPE + "t")  # vote 3: leave the reason box, then tie
        progress_is(3)
        press("x")  # vote 4: both bad
        progress_is(4)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)

    votes = read_votes(db)
    assert [(v.rater, v.answer, v.reason) for v in votes] == [
        ("alice#1", "a", ""), ("alice#1", "b", ""), ("alice#1", "tie", "a tidy bit better"), ("alice#1", "bad", "")
    ]  # fmt: skip
    assert len({(v.item_id, *sorted((v.system_left, v.system_right))) for v in votes}) == 4

    result = CliRunner().invoke(humaneval_app, ["results", str(study), "--n-boot", "50"])
    assert result.exit_code == 0, result.output
    summary = json.loads((study / "human_eval" / "results.json").read_text())
    assert (summary["n_votes"], summary["n_raters"], summary["answers"]) == (4, 1, {"a": 1, "b": 1, "tie": 1, "bad": 1})
    won = {s: 0 for s in CONTINUATIONS}
    for v in votes[:2]:  # the decisive votes
        won[v.system_left if v.answer == "a" else v.system_right] += 1
    assert {r["system"]: r["won"] for r in summary["systems"]} == {s: n for s, n in won.items() if any(s in (v.system_left, v.system_right) for v in votes)}

    if os.environ.get("SMALLSCALE_SAVE_SCREENSHOT") == "1":
        shutil.copyfile(tmp_path / "humaneval_screenshot.png", REPO / "bench" / "results" / "humaneval_screenshot.png")
