"""``fss-demo`` with the bundled model: what a query costs on the page, and what a shot change costs.

- ``query``: one dropped query as the page handles it (decode, encode, match, the overlay it shows).
- ``shot change``: add then remove a shot with 8 queries on the page: the demo re-matches the cached
  query features; the reference re-registers the supports and re-segments every query
  (``Segmenter.set_support`` + ``segment``), as a page without the cache would.
- ``browser``: 1 or 3 example queries dropped on the page in headless Chromium until their overlays
  show (upload, server work, transfer and rendering); skipped without Chromium.

Run: ``pytest benches/bench_demo.py --benchmark-only``.
"""

import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fss
from fss.demo import outputs
from fss.demo.session import Engine, Session
from fss.io.masks import read_mask

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
QUERIES = sorted((EXAMPLES / "query").glob("*.jpg"))


def example_shot(name="bus", index=0):
    image_path = sorted((EXAMPLES / "support" / name).glob("*.jpg"))[index]
    return Image.open(image_path).convert("RGB"), read_mask(image_path.with_suffix(".png"))


@pytest.fixture(scope="module")
def engine():
    return Engine(fss.load_model(None), "bundled demo model", device="cpu")


@pytest.fixture(scope="module")
def queries(tmp_path_factory):
    """8 query files: the 3 example photos, repeated under other names."""
    root = tmp_path_factory.mktemp("queries")
    paths = []
    for i in range(8):
        path = root / f"q{i}.jpg"
        shutil.copy(QUERIES[i % len(QUERIES)], path)
        paths.append(path)
    return paths


def test_query_on_page(benchmark, engine, queries):
    benchmark.group = "demo: one query (bundled model)"
    session = Session(engine)
    session.add_shot("bus", *example_shot())

    def one_query():
        session.clear_queries()
        session.add_queries(queries[:1])
        return outputs.overlays(session)

    assert benchmark(one_query)


def test_shot_change_cached_features(benchmark, engine, queries):
    benchmark.group = "demo: add + remove a shot, 8 queries on the page"
    session = Session(engine)
    session.add_shot("bus", *example_shot())
    session.add_queries(queries)
    extra = example_shot(index=1)

    def change():
        session.add_shot("bus", *extra)
        session.remove_shot("bus", 1)

    benchmark(change)


def test_shot_change_reencode_reference(benchmark, engine, queries):
    benchmark.group = "demo: add + remove a shot, 8 queries on the page"
    seg = engine.segmenter
    first, extra = example_shot(), example_shot(index=1)

    def change():
        for shots in ([first, extra], [first]):
            seg.set_support([[s[0] for s in shots]], [[s[1] for s in shots]], ["bus"])
            seg.segment(queries)

    benchmark(change)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page in headless Chromium with one bus shot added (from its mask file)."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("needs chromium and chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from fss.demo.cli import parse_args, serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = serve(parse_args(["--port", str(port), "--examples", str(EXAMPLES)]), block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=options)
    status = lambda d: d.find_element(By.ID, "status").text  # noqa: E731
    try:
        driver.get(app.local_url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#support-file input[type=file]"))
        support = sorted((EXAMPLES / "support" / "bus").glob("*.jpg"))[0]
        driver.find_element(By.CSS_SELECTOR, "#support-file input[type=file]").send_keys(str(support))
        wait.until(lambda d: "Loaded" in status(d))
        driver.find_element(By.CSS_SELECTOR, "#mask-file input[type=file]").send_keys(
            str(support.with_suffix(".png"))
        )
        wait.until(lambda d: "Mask loaded" in status(d))
        driver.find_element(By.CSS_SELECTOR, "#class-name textarea, #class-name input").send_keys("bus")
        driver.find_element(By.ID, "add-shot").click()
        wait.until(lambda d: "Added shot" in status(d))
        yield driver, wait, By, status
    finally:
        driver.quit()
        app.close()


@pytest.mark.parametrize("count", [1, 3])
def test_browser_drop_queries(benchmark, page, count):
    """Wall time from dropping example queries on the page to their overlays on screen."""
    benchmark.group = "demo page in Chromium: drop queries until their overlays show (bundled model)"
    driver, wait, By, status = page

    def drop_queries():
        driver.find_element(By.ID, "clear-queries").click()
        wait.until(lambda d: "cleared" in status(d))
        start = time.perf_counter()
        driver.find_element(By.CSS_SELECTOR, "#queries input[type=file]").send_keys(
            "\n".join(str(p) for p in QUERIES[:count])
        )
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .thumbnail-item img")) == count)
        return time.perf_counter() - start

    assert np.isfinite(benchmark.pedantic(drop_queries, rounds=5, iterations=1))
