"""Repository promises: the README quickstart is what CI runs and its Python example runs; the docs name
only flags and Python names that exist; the bundled assets are shippable."""

import argparse
import contextlib
import io
import json
import os
import re
import shutil
from importlib import import_module, metadata
from pathlib import Path
from unittest import mock

import pytest
import torch

import fss
import fss.io.images
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
    assert meta["encoder"] in encoder_names() and meta["input_size"] <= 417  # no larger than the paper's
    assert meta["encoder"] in (ROOT / "docs" / "demo-model.md").read_text()
    assert not {"coco-bus", "coco-pizza"} & set(meta["classes"])  # the examples' classes are held out


def machine_paths(value) -> list[str]:
    """Absolute paths (POSIX, Windows, home-relative) among the strings of ``value``, at any depth."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in machine_paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in machine_paths(v)]
    looks_absolute = isinstance(value, str) and re.match(r"(/|~|[A-Za-z]:[\\/]|\\\\)", value)
    return [value] if looks_absolute else []


def test_shipped_models_tell_no_paths_of_the_machine_that_trained_them():
    for asset in sorted((ROOT / "fss" / "assets").glob("*.pt")):
        meta = torch.load(asset, map_location="cpu", weights_only=True)["meta"]
        assert not machine_paths(meta), f"{asset.name}: {machine_paths(meta)}"
    assert machine_paths({"a": ["x", {"b": "/home/me/data"}], "c": "C:\\data", "d": "runs/t1"}) == [
        "/home/me/data",
        "C:\\data",
    ]


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


COMMANDS = ("fss-run", "fss-train", "fss-eval", "fss-export", "fss-serve", "fss-demo")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


class ParserBuilt(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def command_parser(command: str) -> argparse.ArgumentParser:
    """The parser a console script builds, caught when its ``main()`` first parses (nothing runs)."""
    (script,) = (e for e in metadata.entry_points(group="console_scripts") if e.name == command)
    entry = import_module(script.module)
    with mock.patch.object(entry, "launch", lambda prog, module: module):  # fss.entry: which module
        module = getattr(entry, script.attr)()

    def caught(parser, *args, **kwargs):
        raise ParserBuilt(parser)

    parsing = mock.patch.object(argparse.ArgumentParser, "parse_known_args", caught)
    with parsing, pytest.raises(ParserBuilt) as built:
        import_module(module).main([])
    return built.value.parser


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings if s.startswith("--")} - {"--help"}


def code_texts(text: str) -> list[str]:
    """Fenced blocks (lines continued with a backslash joined) and inline code spans."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return [*(block.replace("\\\n", " ") for block in fenced), *re.findall(r"`([^`\n]+)`", rest)]


FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*(?![\w*-])")  # not a pattern like --sst-*


def mentioned_flags() -> dict[str, set[tuple[str, str]]]:
    """Command -> (flag, file) for every ``fss-<cmd> ... --flag`` written in code in the README and docs:
    the flags after a command's name, up to the end of the line, a shell separator or another command."""
    found = {c: set() for c in COMMANDS}
    names = "|".join(COMMANDS)
    for doc in DOCS:
        for code in code_texts(doc.read_text()):
            for line in code.splitlines():
                for invocation in re.split(r"&&|\|\||;|\|(?!\w)", line):
                    parts = re.split(rf"(?<![\w/-])({names})(?![\w-])", invocation)
                    for command, args in zip(parts[1::2], parts[2::2], strict=True):
                        found[command] |= {(f, doc.name) for f in FLAG.findall(args)}
    return found


def test_every_flag_the_docs_mention_exists():
    mentioned = mentioned_flags()
    assert sum(map(len, mentioned.values())) > 50  # the reading works
    for command, flags in mentioned.items():
        known = option_strings(command_parser(command)) | {"--help"}
        assert not {(f, doc) for f, doc in flags if f not in known}, command


def table_cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def reference_table(parser: argparse.ArgumentParser) -> list[str]:
    """A command's options as the rows of its doc's reference table (``python tests/test_repo.py fss-run``
    prints them): option, values (choices or metavar), default, help."""
    rows = ["| option | values | default | what |", "|---|---|---|---|"]
    for action in parser._actions:
        if not action.option_strings or "--help" in action.option_strings:
            continue
        if action.choices:
            values = "|".join(map(str, action.choices))
        elif action.nargs == 0:
            values = ""
        else:
            values = action.metavar or action.dest.upper()
            values = {"+": f"{values} ...", "*": f"{values} ...", "?": f"[{values}]"}.get(
                action.nargs, values
            )
        default = action.default
        if (
            isinstance(default, (str, Path))
            and Path(default).is_absolute()
            and Path(default).is_relative_to(ROOT)
        ):
            default = Path(default).relative_to(ROOT).as_posix()  # a folder of the repository, wherever it is
        shown = (
            action.nargs != 0
            and default is not None
            and default is not False
            and default != argparse.SUPPRESS
        )
        values = f"`{table_cell(values)}`" if values else ""
        cells = [f"`{', '.join(action.option_strings)}`", values, table_cell(default) if shown else ""]
        rows.append(f"| {' | '.join([*cells, table_cell(action.help or '')])} |")
    return rows


def documented_reference(doc: Path, command: str) -> list[str]:
    """The table under a doc's ``### `fss-<cmd>` reference`` heading."""
    section = doc.read_text().split(f"### `{command}` reference\n", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\|.*\|$", section, re.M)


@pytest.mark.parametrize(
    "command, doc",
    [
        ("fss-run", "run.md"),
        ("fss-train", "train.md"),
        ("fss-eval", "train.md"),
        ("fss-export", "export.md"),
        ("fss-serve", "serving.md"),
        ("fss-demo", "demo.md"),
    ],
)
def test_every_command_has_its_full_reference_in_its_topic_doc(command, doc):
    """Every option, its values and default as the parser has them (the help text may be worded for the
    page); regenerate a table with ``python tests/test_repo.py COMMAND``."""
    table_rows = re.findall(r"^\|.*$", (ROOT / "README.md").read_text(), re.M)
    assert any(f"`{command}`" in row and f"(docs/{doc}" in row for row in table_rows)  # README links it
    documented = [row.rsplit(" | ", 1)[0] for row in documented_reference(ROOT / "docs" / doc, command)]
    assert documented == [row.rsplit(" | ", 1)[0] for row in reference_table(command_parser(command))]


FSS_NAME = re.compile(r"(?<![\w./-])fss(?:\.[A-Za-z_]\w*)+(?![\w*-])")


def resolves(name: str) -> bool:
    parts = name.split(".")
    for split in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            value = import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        try:
            for attribute in parts[split:]:
                value = getattr(value, attribute)
        except AttributeError:
            return False
        return True
    return False


def test_every_python_name_the_docs_give_exists():
    names = {(n, d.name) for d in DOCS for code in code_texts(d.read_text()) for n in FSS_NAME.findall(code)}
    assert len(names) > 20  # the reading works
    assert not {(n, doc) for n, doc in names if not resolves(n)}


def readme_python_example() -> str:
    section = (ROOT / "README.md").read_text().split("## Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs_verbatim(tmp_path):
    """The README's example, as written, in a folder holding the bundled examples: it prints one line per
    query with the query's name and the label map's size."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    printed = io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        with contextlib.redirect_stdout(printed):
            exec(compile(readme_python_example(), "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
    queries = sorted((ROOT / "examples" / "query").glob("*.jpg"))
    lines = printed.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == [q.name for q in queries]
    for line, query in zip(lines, queries, strict=True):
        width, height = fss.io.images.read_image(query).size
        assert f"({height}, {width})" in line, line


def heading_anchors(doc: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation but '-' dropped."""
    headings = re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_link_between_the_docs_lands():
    links = {(doc, target) for doc in DOCS for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text())}
    local = {(doc, t) for doc, t in links if not re.match(r"[a-z]+:", t)}
    assert len(local) > 20  # the reading works
    for doc, target in local:
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), (doc.name, target)
        assert not anchor or anchor in heading_anchors(linked), (doc.name, target)


REPO_PATH = re.compile(
    r"(?<![\w./-])((?:fss|kernels|runtime|export|train|demo|serve|tests|benches|examples|docs|\.ci)/[\w./-]*\w)"
    r"(?:::(\w+)(\*?))?"
)


def test_every_repository_path_the_docs_give_exists():
    """A file the docs point to exists, and ``tests/x.py::test_y`` (or ``test_y*``) names a test in it."""
    paths = {
        (m.groups(), d.name)
        for d in DOCS
        for code in code_texts(d.read_text())
        for m in REPO_PATH.finditer(code)
    }
    assert len(paths) > 20  # the reading works
    for (path, function, prefix), doc in paths:
        assert (ROOT / path).exists(), (doc, path)
        if function:
            pattern = rf"def {function}{'' if prefix else '[(]'}"
            assert re.search(pattern, (ROOT / path).read_text()), (doc, path, function)


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:]:
        print(f"### `{name}` reference\n", *reference_table(command_parser(name)), sep="\n")
