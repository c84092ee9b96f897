"""``fss-demo`` in a real browser: Debian's Chromium driven by Selenium through chromedriver.

A person's path: pick an example support, paint the object with the brush, name the class, add the
shot, drop a query, download the zip. The zip's mask must be exactly what ``fss-run`` writes for the
same support image, the painted mask read back from the zip, and the same query. Skipped when
Chromium, chromedriver, Selenium or Gradio are missing; CI installs them (see .ci/run).
"""

import io
import json
import os
import shutil
import socket
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
REQUIRED = os.environ.get("FSS_REQUIRE_BROWSER") == "1"  # CI: fail, never skip
if not REQUIRED:
    pytest.importorskip("gradio")
    pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER or REQUIRED), reason="needs chromium and chromium-driver"
    ),
]

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from fss.demo.cli import parse_args, serve  # noqa: E402
from fss.runtime.cli import main as fss_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SUPPORT = EXAMPLES / "support" / "bus" / "000000423617.jpg"  # the first example the page shows
# A street with a red bus: a brush stroke across the support's bus finds it (on the airport photo the
# bundled model paints nothing from a stroke, and page and fss-run would agree on an empty mask).
QUERY = EXAMPLES / "query" / "000000252639.jpg"
TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    app = serve(parse_args(["--port", str(free_port()), "--examples", str(EXAMPLES)]), block=False)
    yield app.local_url
    app.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_status(driver, predicate, what: str) -> str:
    """The status line's text once ``predicate(text)`` holds."""
    WebDriverWait(driver, TIMEOUT).until(
        lambda d: predicate(d.find_element(By.ID, "status").text), message=f"status never showed {what}"
    )
    return driver.find_element(By.ID, "status").text


def message_near(driver, message_id: str, control_id: str, text: str) -> str:
    """The message under a control once it shows ``text``: visible, and right below the control (the
    status line at the top is off-screen while the user works at the bottom of the page)."""
    WebDriverWait(driver, TIMEOUT).until(
        lambda d: text in d.find_element(By.ID, message_id).text, message=f"#{message_id} never showed {text}"
    )
    message, control = driver.find_element(By.ID, message_id), driver.find_element(By.ID, control_id)
    assert message.is_displayed()
    gap = message.rect["y"] - (control.rect["y"] + control.rect["height"])
    assert 0 <= gap < 80, f"#{message_id} is {gap}px below #{control_id}"
    overlap = min(message.rect["x"] + message.rect["width"], control.rect["x"] + control.rect["width"])
    assert overlap - max(message.rect["x"], control.rect["x"]) > 50, "not in the control's column"
    return message.text


def paint_stroke(driver) -> None:
    """Select the brush and drag it across the middle of the editor's canvas."""
    editor = driver.find_element(By.ID, "editor")
    editor.find_element(By.CSS_SELECTOR, "button[aria-label=Brush]").click()
    canvas = editor.find_elements(By.CSS_SELECTOR, "canvas")[-1]
    stroke = ActionChains(driver).move_to_element_with_offset(canvas, -80, -10).click_and_hold()
    for _ in range(16):
        stroke = stroke.move_by_offset(10, 2)
    stroke.release().perform()


def test_paint_support_segment_query_equals_fss_run(server, browser, tmp_path):
    browser.get(server)
    WebDriverWait(browser, TIMEOUT).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#example-supports button")
    )
    # No queries: no results table (an empty one showed Gradio's placeholder headers "1 2 3").
    assert not any(table.is_displayed() for table in browser.find_elements(By.ID, "table"))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a photo")
    browser.find_element(By.CSS_SELECTOR, "#support-file input[type=file]").send_keys(str(corrupt))
    message_near(browser, "support-message", "support-file", "unreadable or corrupt image (corrupt.jpg)")

    browser.find_elements(By.CSS_SELECTOR, "#example-supports .thumbnail-item")[0].click()
    wait_status(browser, lambda t: SUPPORT.name in t, "the example loaded")
    assert (
        browser.find_element(By.CSS_SELECTOR, "#class-name textarea, #class-name input").get_attribute(
            "value"
        )
        == "bus"
    )

    # Adding before painting is refused with a message; the page stays usable.
    browser.find_element(By.ID, "add-shot").click()
    assert "no foreground" in wait_status(browser, lambda t: "Error" in t, "the empty-mask error")
    message_near(browser, "add-shot-message", "add-shot", "no foreground")

    paint_stroke(browser)
    time.sleep(0.5)  # the editor commits the stroke on pointer-up
    browser.find_element(By.ID, "add-shot").click()
    wait_status(browser, lambda t: "Added shot 1 of bus" in t, "the shot added")
    message_near(browser, "add-shot-message", "add-shot", "Added shot 1 of bus")
    # The paint is gone from the editor: a second click cannot add the same shot again.
    time.sleep(1)  # the editor is reset after the click's own update
    browser.find_element(By.ID, "add-shot").click()
    message_near(browser, "add-shot-message", "add-shot", "no foreground")
    # (The mask file is tried once the shot is in: its event updates the editor, which may redraw
    # its canvas under a brush stroke that follows at once.)
    small_mask = tmp_path / "small_mask.png"
    Image.new("L", (10, 10), 255).save(small_mask)
    browser.find_element(By.CSS_SELECTOR, "#mask-file input[type=file]").send_keys(str(small_mask))
    message_near(browser, "mask-message", "mask-file", "differs from image size")

    browser.find_element(By.CSS_SELECTOR, "#queries input[type=file]").send_keys(f"{QUERY}\n{corrupt}")
    status = wait_status(browser, lambda t: "file(s) added" in t, "the queries added")
    assert "unreadable or corrupt image (corrupt.jpg)" in status
    message_near(browser, "queries-message", "queries", "unreadable or corrupt image (corrupt.jpg)")
    table = WebDriverWait(browser, TIMEOUT).until(  # the table, hidden while empty, is shown now
        lambda d: [t.text for t in d.find_elements(By.ID, "table") if QUERY.name in t.text]
    )[0]
    assert QUERY.name in table and "error" in table

    browser.find_element(By.ID, "zip").click()
    wait_status(browser, lambda t: "Zip ready" in t, "the zip")
    link = WebDriverWait(browser, TIMEOUT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#zip-file a"))[0]
    with urllib.request.urlopen(link.get_attribute("href"), timeout=TIMEOUT) as response:
        archive = zipfile.ZipFile(io.BytesIO(response.read()))
    screenshot = Path(os.environ.get("FSS_DEMO_SCREENSHOT", tmp_path / "demo.png"))
    browser.save_screenshot(str(screenshot))
    assert Image.open(screenshot).size[0] > 0

    # The zip holds the support the page used: the example's own pixels and the painted mask.
    shot = np.asarray(Image.open(archive.open("support/bus/shot01.png")))
    assert np.array_equal(shot, np.asarray(Image.open(SUPPORT).convert("RGB")))
    painted = np.asarray(Image.open(archive.open("support/bus/shot01_mask.png")))
    assert painted.shape == shot.shape[:2] and set(np.unique(painted)) == {0, 1}
    assert 0.002 < painted.mean() < 0.3, "a brush stroke, not an empty or full mask"
    ys, xs = np.nonzero(painted)  # the stroke crossed the middle of the displayed image, left to right
    height, width = painted.shape
    assert abs(xs.mean() - width / 2) < 0.15 * width and abs(ys.mean() - height / 2) < 0.15 * height
    assert xs.max() - xs.min() > 0.25 * width

    # fss-run on the same support image, the mask read back from the page, and the same query.
    support = tmp_path / "support" / "bus"
    support.mkdir(parents=True)
    shutil.copy(SUPPORT, support / SUPPORT.name)
    Image.fromarray(painted * 255).save(support / f"{SUPPORT.stem}.png")
    query = tmp_path / "query"
    query.mkdir()
    shutil.copy(QUERY, query / QUERY.name)
    out = tmp_path / "out"
    assert fss_run(["--support", str(support.parent), "--query", str(query), "--out", str(out)]) == 0
    page_mask = np.asarray(Image.open(archive.open(f"{QUERY.stem}.png")))
    run_mask = np.asarray(Image.open(out / f"{QUERY.stem}.png"))
    assert page_mask.shape == run_mask.shape == (Image.open(QUERY).height, Image.open(QUERY).width)
    assert np.array_equal(page_mask, run_mask)
    assert 0 < (page_mask == 1).mean() < 1, "the comparison is not between two trivial masks"
    page_results = json.loads(archive.read("results.json"))
    run_results = json.loads((out / "results.json").read_text())
    assert page_results["classes"] == run_results["classes"]
    page_query = [q for q in page_results["queries"] if q["file"] == QUERY.name][0]
    assert page_query["fractions"] == run_results["queries"][0]["fractions"]
    assert {q["file"]: q.get("error") for q in page_results["queries"]}["corrupt.jpg"]

    # Removing the only shot leaves the queries waiting for a support.
    browser.find_elements(By.CSS_SELECTOR, "#shots .thumbnail-item")[0].click()
    wait_status(browser, lambda t: "Selected bus #1" in t, "the shot selected")
    browser.find_element(By.ID, "remove-shot").click()
    wait_status(browser, lambda t: "Removed bus #1" in t, "the shot removed")
    WebDriverWait(browser, TIMEOUT).until(
        lambda d: "waiting for a support shot" in d.find_element(By.ID, "table").text
    )


def test_a_second_tab_does_not_see_the_first_tabs_supports(server, browser):
    browser.switch_to.new_window("tab")
    browser.get(server)
    WebDriverWait(browser, TIMEOUT).until(lambda d: d.find_elements(By.ID, "queries"))
    browser.find_element(By.CSS_SELECTOR, "#queries input[type=file]").send_keys(str(QUERY))
    status = wait_status(browser, lambda t: "file(s) added" in t, "the query added")
    assert "Add a support shot" in status
    assert not browser.find_elements(By.CSS_SELECTOR, "#shots .thumbnail-item")


def test_box_tool_makes_the_shots_mask(server, browser):
    """A typed box is the mask (its pixel count); a brush stroke dragged across the object gives its box,
    refined by GrabCut."""
    browser.switch_to.new_window("tab")
    browser.get(server)
    WebDriverWait(browser, TIMEOUT).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#example-supports button")
    )
    browser.find_elements(By.CSS_SELECTOR, "#example-supports .thumbnail-item")[0].click()
    wait_status(browser, lambda t: SUPPORT.name in t, "the example loaded")
    browser.find_element(By.CSS_SELECTOR, "#box-text textarea, #box-text input").send_keys("100 80 300 200")
    browser.find_element(By.CSS_SELECTOR, "#box-mode input[value=box]").click()
    browser.find_element(By.ID, "use-box").click()
    wait_status(browser, lambda t: "Box 100 80 300 200 as box: 24000 pixels" in t, "the typed box")
    browser.find_element(By.ID, "add-shot").click()
    wait_status(browser, lambda t: "Added shot 1 of bus (24000 pixels)" in t, "the box shot added")
    browser.find_element(By.CSS_SELECTOR, "#box-text textarea, #box-text input").clear()
    browser.find_element(By.CSS_SELECTOR, "#box-mode input[value=GrabCut]").click()
    paint_stroke(browser)
    time.sleep(0.5)  # the editor commits the stroke on pointer-up
    browser.find_element(By.ID, "use-box").click()
    status = wait_status(browser, lambda t: "as GrabCut" in t or "Error" in t, "the dragged box")
    assert "Error" not in status and int(status.split(": ")[1].split()[0]) > 0
