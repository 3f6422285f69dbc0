"""ssl/app.py in a real browser: the server started as a user starts it, headless Chromium
driven by Selenium through the Score tab (upload, score) and the Review tab (accept, reject,
re-score), then the corrections CSV checked.

Needs `apt-get install -y chromium chromium-driver` and `pip install selenium` (skipped with
that message otherwise). AESSL_APP_SCREENSHOT=docs/app.png also saves a screenshot of the
Review tab with an image selected (the one in docs/app.md)."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, free_port, random_model

from aessl import export as ex

pytestmark = pytest.mark.timeout(300)

INSTALL = "install them with `apt-get install -y chromium chromium-driver` and `pip install selenium`"
WAIT = 45  # seconds any one thing in the page may take (a loaded 2-core CI box)
SERVER_START = 180  # seconds for the server to answer (python + torch + gradio imports)


def _chromium() -> tuple[str | None, str | None]:
    browser = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                    if p and os.path.exists(p)), None)
    driver = next((p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver") if p and os.path.exists(p)),
                  None)
    return browser, driver


def _missing() -> str | None:
    if importlib.util.find_spec("gradio") is None:
        return "gradio missing (the app's own dependency): pip install gradio"
    missing = []
    if importlib.util.find_spec("selenium") is None:
        missing.append("selenium")
    browser, driver = _chromium()
    if browser is None:
        missing.append("chromium")
    if driver is None:
        missing.append("chromedriver")
    return f"{', '.join(missing)} missing: {INSTALL}" if missing else None


def wait_for_server(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            pytest.fail(f"ssl/app.py exited {proc.returncode} before answering:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"ssl/app.py did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    why = _missing()
    if why:
        pytest.skip(why)
    from aessl.synth.dataset import generate

    root = tmp_path_factory.mktemp("appb")
    generate(root / "synth", labeled=11, unlabeled=18, test=11, size=128, workers=1, progress=False)
    pool = root / "synth" / "unlabeled"
    run = random_model(root / "run" / "model", 4, [0.25] * 11)
    export = root / "exports" / "pool"
    assert ex.main(["--model", str(run), "--images", str(pool), "--out", str(export), "--workers", "0",
                    "--device", "cpu"]) == 0
    rows = [r for f in sorted(export.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]
    rows.sort(key=lambda r: (-r["score_percent"], r["path"]))  # the Review tab's default order
    corrections = root / "corrections.csv"
    port = free_port()
    log = root / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "ssl" / "app.py"), "--model", str(run), "--export",
                                 str(export), "--corrections", str(corrections), "--port", str(port), "--device",
                                 "cpu"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield {"proc": proc, "log": log, "port": port, "rows": rows, "corrections": corrections, "root": root,
               "url": f"http://127.0.0.1:{port}/"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def text_of(driver, elem_id: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return driver.find_element("id", elem_id).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def until(driver, what: str, check, timeout: float = WAIT):
    """Wait until check(driver) is truthy; fail saying what was awaited (and the server log)."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1,
                             ignored_exceptions=(StaleElementReferenceException,)).until(check)
    except TimeoutException:
        pytest.fail(f"timed out waiting for {what}")


def thumbnails(driver):
    return driver.find_elements("css selector", "#review-gallery button.thumbnail-item")


def test_score_and_review_in_a_browser(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    d, rows = browser, server["rows"]
    wait_for_server(server["proc"], server["url"], server["log"], SERVER_START)
    d.get(server["url"])

    # ---------------------------------------------------------------- Score: upload one image
    image = Path(rows[-1]["path"])
    file_input = until(d, "the Score tab's file input",
                       lambda d: d.find_element("css selector", "#score-files input[type=file]"))
    file_input.send_keys(str(image))
    until(d, "the upload to finish", lambda d: image.stem in text_of(d, "score-files"))
    d.find_element("id", "score-button").click()
    summary = until(d, "a score in the Score tab",
                    lambda d: t if "1 image(s) scored" in (t := text_of(d, "score-summary")) else None)
    assert f"{rows[-1]['score_percent']:.1f}%" in summary  # the export's percent for that image
    assert ("accepted" if rows[-1]["accepted"] else "uncertain") in summary

    # ---------------------------------------------------------------- Review: three decisions
    d.find_element("xpath", "//button[@role='tab' and contains(., 'Review')]").click()
    until(d, "the Review gallery", lambda d: len(thumbnails(d)) == len(rows))
    score_box = "#review-score input"
    plan = [("accept", "review-accept", "accepted"), ("reject", "review-reject", "rejected"),
            ("rescore", "review-rescore", "re-scored")]
    for i, (decision, button, word) in enumerate(plan):
        name = Path(rows[i]["path"]).name
        thumbnails(d)[i].click()
        until(d, f"row {i + 1} ({name}) to be shown", lambda d: rows[i]["path"] in text_of(d, "review-details"))
        if decision == "rescore":
            held = []

            def typed(d):
                # the row's own score can reach the box a tick after its details (one event,
                # two components) and replace what was typed: type again until it holds
                box = d.find_element("css selector", score_box)
                if box.get_attribute("value") != "3.5":
                    held.clear()
                    box.send_keys(Keys.CONTROL, "a")
                    box.send_keys("3.5", Keys.TAB)
                    return False
                held.append(True)
                return len(held) >= 3  # unchanged over three polls (0.2 s)

            until(d, "the score box to hold 3.5", typed)
        if decision == "reject":
            ActionChains(d).send_keys("r").perform()  # the keyboard shortcut
        else:
            d.find_element("id", button).click()
        until(d, f"the {decision} of {name} to be confirmed",
              lambda d: word in (t := text_of(d, "review-status")) and name in t)

    until(d, "the table to show the decisions",
          lambda d: all(w in text_of(d, "review-table") for w in ("accepted", "rejected", "re-scored 3.50")))
    until(d, "the gallery's captions to show the decisions",
          lambda d: all(w in text_of(d, "review-gallery") for w in ("[accepted", "[rejected]", "[re-scored 3.50]")))
    with open(server["corrections"], newline="") as f:
        written = list(csv.DictReader(f))
    assert [(r["path"], r["decision"], r["source"]) for r in written] == [
        (rows[0]["path"], "accept", "review"), (rows[1]["path"], "reject", "review"),
        (rows[2]["path"], "rescore", "review")]
    assert float(written[0]["score"]) == pytest.approx(rows[0]["expected_score"], abs=1e-3)
    assert written[1]["score"] == "" and float(written[2]["score"]) == 3.5

    shot = os.environ.get("AESSL_APP_SCREENSHOT")
    if shot:
        thumbnails(d)[3].click()
        until(d, "row 4 to be shown", lambda d: rows[3]["path"] in text_of(d, "review-details"))
        until(d, "the selected image", lambda d: d.find_elements("css selector", "#review-image img"))
        d.set_window_size(1400, 1400)
        d.execute_script("window.scrollTo(0, 0);")
        time.sleep(0.5)  # let the image and plot paint
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        assert d.save_screenshot(str(Path(shot).resolve()))

    # ---------------------------------------------------------------- Label next: one score saved
    d.find_element("xpath", "//button[@role='tab' and contains(., 'Label next')]").click()
    until(d, "the Build queue button", lambda d: d.find_element("id", "label-build")).click()
    boxes = until(d, "the queue", lambda d: d.find_elements("css selector", ".label-score input, .label-score textarea"))
    boxes[0].send_keys("6.5", Keys.ENTER)
    until(d, "the label to be saved", lambda d: any("saved 6.5" in e.text for e in
                                                   d.find_elements("css selector", ".label-saved")))
    with open(server["corrections"], newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert (last["decision"], last["score"], last["source"]) == ("rescore", "6.5", "label_next")
    assert last["path"] not in {r["path"] for r in rows[:3]}  # decided images are not queued again
    log = server["log"].read_text()
    assert "Traceback" not in log, log[-4000:]


def test_blocks_build_without_a_browser(tmp_path):
    """The UI is put together (every tab, with and without an export) even where no browser is."""
    gr = pytest.importorskip("gradio", reason="gradio missing: pip install gradio")
    from aessl import app as A

    pool = tmp_path / "pool"
    pool.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (40, 40), (i * 80, 100, 50)).save(pool / f"p{i}.png")
    run = random_model(tmp_path / "run" / "model", 0, [])
    export = tmp_path / "exp"
    assert ex.main(["--model", str(run), "--images", str(pool), "--out", str(export), "--workers", "0",
                    "--device", "cpu"]) == 0
    demo = A.build_app(run, export=export, device="cpu")
    assert isinstance(demo, gr.Blocks) and (tmp_path / "exp-corrections.csv").is_file()
    assert isinstance(A.build_app(run, device="cpu"), gr.Blocks)
