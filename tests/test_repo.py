"""Repository promises: the README quickstart is what CI runs; the bundled assets are shippable."""

import json
import re
from pathlib import Path

import pytest

import fss
import fss.io.masks
from fss.models.encoders import encoder_names

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
    assert ci_lines.index(commands[0]) + 1 == ci_lines.index(commands[1])  # the two, in order, first


def test_ci_runs_every_bench_once():
    """Benches rot unseen unless CI runs them: all of ``benches/``, once each, on small inputs."""
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "FSS_BENCH_QUICK=1 python3 -m pytest -q benches --benchmark-disable" in ci_lines


def test_demo_model_is_bundled_small_and_described():
    from fss.checkpoint import DEMO_MODEL

    assert DEMO_MODEL.stat().st_size <= 16 * 2**20
    model = fss.load_model(None)
    meta = model.meta
    assert meta["method"] == "panet" and meta["classes"], meta
    assert meta["encoder"] in encoder_names() and meta["input_size"] < 417
    assert meta["encoder"] in (ROOT / "docs" / "demo-model.md").read_text()
    assert not {"coco-bus", "coco-pizza"} & set(meta["classes"])  # the examples' classes are held out


@pytest.mark.parametrize("cls", ["bus", "pizza"])
def test_demo_model_segments_the_examples(cls):
    """One example shot segments the other photo of its class (both real, held-out classes): IoU with
    its annotation >= 0.5 both ways (0.60 / 0.61 for bus, 0.65 / 0.74 for pizza when written)."""
    seg = fss.Segmenter(None)
    images = sorted((ROOT / "examples" / "support" / cls).glob("*.jpg"))
    for support, query in (images, images[::-1]):
        seg.set_support([[support]], [[support.with_suffix(".png")]], [cls])
        predicted = seg.segment([query])[0] == 1
        truth = fss.io.masks.read_mask(query.with_suffix(".png"))
        valid = truth != 255
        iou = (predicted & (truth == 1) & valid).sum() / ((predicted | (truth == 1)) & valid).sum()
        assert iou >= 0.5, (support.name, query.name, iou)


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
