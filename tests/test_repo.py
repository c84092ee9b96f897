"""Repository promises: the README quickstart is what CI runs; the bundled assets are shippable."""

import json
import re
from pathlib import Path

import fss

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_quickstart_verbatim():
    commands = quickstart_commands()
    assert len(commands) == 2
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert all(c in ci_lines for c in commands)
    assert ci_lines.index(commands[0]) < ci_lines.index(commands[1])


def test_demo_model_is_bundled_small_and_described():
    from fss.checkpoint import DEMO_MODEL

    assert DEMO_MODEL.stat().st_size <= 10 * 2**20
    model = fss.load_model(None)
    meta = model.meta
    assert meta["method"] == "panet" and meta["classes"], meta
    assert meta["input_size"] < 417 and meta["width"] < 1


SHIPPABLE_LICENCES = {  # COCO licence ids 4, 5, 7, 8
    "Attribution License",
    "Attribution-ShareAlike License",
    "No known copyright restrictions",
    "United States Government Work",
}


def test_examples_are_licensed_for_shipping():
    examples = ROOT / "examples"
    records = {r["file"]: r for r in json.loads((examples / "attribution.json").read_text())}
    shipped = {
        p.relative_to(examples).as_posix()
        for p in examples.rglob("*")
        if p.suffix.lower() in {".jpg", ".jpeg", ".png"} and "support" in p.parts or p.parent.name == "query"
    }
    photos = {f for f in shipped if not f.endswith(".png")}
    assert photos and photos == set(records), "every shipped photo and only those are attributed"
    for record in records.values():
        assert record["license"] in SHIPPABLE_LICENCES and record["flickr_url"], record
    attribution = (examples / "ATTRIBUTION.md").read_text()
    assert all(f in attribution for f in photos)
