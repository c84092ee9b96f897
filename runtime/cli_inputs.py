"""fss-run's inputs: what ``--out`` may be beside them, and the support set with its content hash."""

import hashlib
import json
from pathlib import Path

from fss.errors import FssError
from fss.io.outputs import LOCK_FILE
from fss.runtime import cli_results
from fss.runtime.cli_resume import OVERLAYS, RESULTS_FILE, file_sha256


def check_out_against_inputs(
    out: Path, support: Path, folders: list[Path], queries: list[Path], other_inputs: list[Path]
) -> None:
    """Outputs never overwrite or mix with inputs (symbolic links resolved).

    Refused: ``out`` or ``out/overlays`` being an input folder (the query folder, the support folder
    or a class folder), an input folder inside ``out/overlays``, ``out`` directly in the support
    folder (a later run would read it as a class), and any output path that is an input file.
    Allowed: ``out`` deeper inside an input folder (e.g. ``--query . --out fss-out``): folders are
    read one level deep, so a subfolder of the query folder is never read as a query.
    """
    out_dirs = [out.resolve(), out.resolve() / OVERLAYS]
    for folder in folders:
        resolved = folder.resolve()
        if resolved in out_dirs or out_dirs[1] in resolved.parents:
            raise FssError(
                f"--out would write into the input folder {folder}: outputs would overwrite or mix with "
                "inputs; choose another --out",
                out,
            )
    if out_dirs[0].parent == support.resolve():
        raise FssError(
            f"--out lies in the support folder {support}: a later run would read it as a class; choose "
            "another --out",
            out,
        )
    outputs = {out_dirs[0] / RESULTS_FILE, out_dirs[0] / LOCK_FILE, out_dirs[0] / cli_results.INSTANCES_FILE}
    resolved_files = {f.resolve(): f for f in queries + other_inputs}
    for path in queries:
        outputs |= {out_dirs[0] / f"{path.stem}.png", out_dirs[1] / f"{path.stem}.jpg"}
    clash = sorted(set(resolved_files) & outputs)
    if clash:
        raise FssError(f"an output would overwrite the input {resolved_files[clash[0]]}", out)


def load_supports(pairs, box_supports: str = "mask"):
    """Class names, their (image, parsed mask) shots and the content hash of the support set."""
    from fss.io.boxes import box_files
    from fss.io.masks import read_support_shots

    classes, images, masks = read_support_shots(pairs, box_supports)
    hashes = [  # prototypes are means: the shot order is irrelevant
        [name, sorted([file_sha256(image), file_sha256(mask)] for image, mask in class_pairs)]
        for name, class_pairs in pairs.items()
    ] + ([["box_supports", box_supports]] if box_files(pairs) else [])  # boxes' masks depend on it
    support_sha = hashlib.sha256(json.dumps(hashes).encode()).hexdigest()
    return classes, images, masks, support_sha
