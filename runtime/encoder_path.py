"""Which path runs a checkpoint's encoder: the faster *verified* one for this job.

On the CPU, ONNX Runtime runs our encoders faster than eager PyTorch (docs/performance.md): ~2-3x for
EfficientNet-Lite, ~1.1x for VGG16 at 417 px. Getting there costs a one-off export of the model's
encoder, verified against eager PyTorch (``fss.export``'s float32 tolerance, on noise, a smooth image
and the bundled example photos), kept in a cache folder under a digest of everything the bundle depends
on: the model's weights and metadata, the input size and the versions of fss, torch and ONNX Runtime.
Later runs validate the cached bundle (its verification record and every file's sha256) and load it in
milliseconds; a graph that failed verification is remembered (``<digest>.refused``) and not exported
again. Where the ONNX Runtime path is not possible (ONNX tools not installed, cache not writable, export
refused), ``auto`` runs torch and says why. On CUDA, and for adaptation (it fine-tunes the torch
weights), the path is torch.

The export costs far more than a few images (VGG16: ~36 torch encoder passes, Lite0: ~300), so for a
new checkpoint ``auto`` takes the path that is faster for *this* job (:func:`export_pays`): it exports
first only when the job's images repay the export (a long-lived caller that gives no count: always);
otherwise it runs torch and exports in a background process at idle CPU priority once the job's process
has ended (on 2 cores, even an idle-priority export beside the job made a VGG16 job ~2x slower), so that
the next job finds the verified graph. One exporter per cache entry at a time (a lock file); a bundle
becomes visible only complete and verified (staged, then renamed into place).

The cache folder is ``$FSS_CACHE_DIR``, else ``$XDG_CACHE_HOME/fss``, else ``~/.cache/fss``.
"""

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import fss
from fss.errors import FssError

CHOICES = ("auto", "torch", "onnxruntime")
CACHE_ENV = "FSS_CACHE_DIR"
CACHE_FORMAT = 1  # bump when the cached bundle's layout or verification changes
EXAMPLE_PHOTOS = Path(fss.__file__).resolve().parent.parent / "examples"
ONNX_TOOLS = ("onnx", "onnxscript", "onnxruntime")
EXPORTER = "fss.runtime.background_export"  # the background exporter's module
# The exporter's command: wait for the end of the job (its stdin closes) before importing anything:
# even importing torch beside a short job made it slower on 2 cores.
EXPORTER_BOOT = (
    f"import sys; sys.stdin.buffer.read(); from {EXPORTER} import main; sys.exit(main(sys.argv[1:]))"
)
log = logging.getLogger("fss.runtime")  # commands print its notes (fss.command)


@dataclass(frozen=True)
class ExportGain:
    """What ONNX Runtime gains on an encoder family (measured on the 2-core CPU, docs/performance.md)."""

    speedup: float  # torch time / ONNX Runtime time per encoder pass
    export_passes: float  # the one-off export + verification, in torch encoder passes

    def break_even_images(self) -> int:
        """Images after which ``export + N x ORT pass`` beats ``N x torch pass``."""
        return math.ceil(self.export_passes / (1 - 1 / self.speedup))


# Encoder name prefix -> gain, from idle figures of docs/performance.md ("First run of a new checkpoint"):
# VGG16 at 417 px 0.37 vs 0.33 s per pass, export 13.5 s (-> ~400 images); EfficientNet-Lite0 at 321 px
# 30 vs 16 ms, export 9 s (-> ~600 images). Under load torch slows down more than ONNX Runtime, and the
# export with it: the break-even moves, but a small job's cold run stays far cheaper in torch. An
# encoder not listed is exported in the background only.
EXPORT_GAINS = {
    "vgg16": ExportGain(speedup=1.1, export_passes=36),
    "efficientnet-lite": ExportGain(speedup=2.0, export_passes=300),
}


@dataclass(frozen=True)
class EncoderPath:
    """The model to run (a torch model, or a :class:`fss.backends.bundle_model.BundleModel`), the backend's
    name and one line saying why."""

    model: object
    backend: str
    reason: str


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fss"


def missing_onnx_tools() -> list[str]:
    return [name for name in ONNX_TOOLS if importlib.util.find_spec(name) is None]


def encoder_digest(model, size: int) -> str:
    """sha256 of what the cached bundle depends on: the model's weights (names, dtypes, shapes, bytes;
    all of them: a bundle may carry a head or a second branch besides the encoder), its meta (the
    bundle's manifest repeats it), the input size and the tool versions."""
    import onnxruntime

    header = {
        "cache_format": CACHE_FORMAT,
        "meta": model.meta,
        "width": getattr(model.encoder, "width", None),
        "size": int(size),
        "fss": fss.__version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_folder(model, size: int) -> Path:
    return cache_root() / "encoders" / encoder_digest(model, size)[:40]


def export_pays(model, images: int | None) -> bool:
    """Whether exporting now, before a job of ``images`` encoder passes, makes the job faster than
    running it in torch (``None``: a long-lived caller, it always pays)."""
    if images is None:
        return True
    name = str(model.meta.get("encoder", ""))
    gain = next((gain for prefix, gain in EXPORT_GAINS.items() if name.startswith(prefix)), None)
    return gain is not None and images >= gain.break_even_images()


def verification_photos() -> list[Path]:
    """Real photos for the export's verification: the bundled examples, where this install has them."""
    from fss.io.folders import list_images

    if not (EXAMPLE_PHOTOS / "query").is_dir():
        return []
    return list_images(EXAMPLE_PHOTOS / "query")[0][:2]


@contextlib.contextmanager
def export_lock(folder: Path, wait: bool):
    """Hold the lock file of cache entry ``folder`` (in ``locks/``) while exporting into (or removing)
    ``folder``; yields False, without waiting, when another process holds it and ``wait`` is off."""
    locks = folder.parent.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)  # releases the lock; so does the death of the process


def refused_marker(folder: Path) -> Path:
    return folder.with_name(folder.name + ".refused")


def check_not_refused(folder: Path) -> None:
    from fss.export.verify import VerificationError

    refused = refused_marker(folder)
    if refused.is_file():  # verification is deterministic: a refused graph is not exported again
        raise VerificationError(refused.read_text().strip())


def load_verified(folder: Path, model, size: int, warn: bool = True):
    """The cached bundle in ``folder``, loaded for ONNX Runtime on the CPU, or None when there is none.
    Only a complete entry (every file matching its sha256) that records a passed float32 verification of
    this very digest is used; a damaged one is replaced by the next export."""
    if not folder.exists():
        return None
    try:
        check_verified_entry(folder)
        return load_cached(folder, model, size)  # validates every file's sha256 in the same pass
    except FssError as exc:
        if warn:
            log.warning("rebuilding a damaged cached encoder (%s)", exc)
        return None


def check_verified_entry(folder: Path) -> None:
    from fss.backends.bundle_format import read_manifest

    manifest = read_manifest(folder)
    report = (manifest.get("verification") or {}).get("onnxruntime") or {}
    error, tolerance = report.get("max_relative_error"), report.get("tolerance")
    verified = isinstance(error, float) and isinstance(tolerance, float) and error <= tolerance
    source = manifest.get("source_checkpoint") or {}
    if not verified or source.get("encoder_digest") != folder.name:
        raise FssError("cached encoder without a passed verification of this model", folder)


def export_into_cache(model, folder: Path, size: int) -> None:
    """Export, verify and publish ``model``'s bundle as ``folder``; the caller holds the export lock, so
    what lies at ``folder`` or is staged beside it is a damaged entry or a killed exporter's: ours to
    remove (a cache entry, never user data). A graph beyond tolerance is remembered as refused, and
    raises ``VerificationError``."""
    from fss.export.build import export_model_bundle
    from fss.export.verify import VerificationError
    from fss.io.outputs import atomic_write

    for stale in [folder, *folder.parent.glob(f".{folder.name}.*.tmp")]:
        shutil.rmtree(stale, ignore_errors=True)
    source = {"file": "(in-memory model)", "encoder_digest": folder.name}
    try:
        export_model_bundle(model, folder, source, size=size, verify_images=verification_photos())
    except VerificationError as exc:
        reason = f"{exc.message}\n".encode()
        atomic_write(refused_marker(folder), lambda f: f.write(reason))
        raise


def export_locked(model, folder: Path, size: int, wait: bool):
    """The bundle exported into ``folder`` under its lock (or found there once the lock is ours); None
    when another process holds the lock and ``wait`` is off."""
    with export_lock(folder, wait) as held:
        if not held:
            return None
        check_not_refused(folder)
        if (bundle := load_verified(folder, model, size, warn=False)) is not None:
            return bundle  # another exporter finished meanwhile
        log.info("exporting and verifying the encoder for ONNX Runtime (once per checkpoint and size)")
        export_into_cache(model, folder, size)
        return load_cached(folder, model, size)


def load_cached(folder: Path, model, size: int):
    from fss.backends.bundle_model import load_bundle

    return load_bundle(folder, backend="onnxruntime", device="cpu", input_size=size, impl=model.impl)


def start_background_export(model, folder: Path, size: int) -> bool:
    """Export ``model`` into the cache in a separate process at idle CPU priority that outlives this one
    (:mod:`fss.runtime.background_export`); False when an exporter is running already: one at a time
    per cache, so that a loop over many new checkpoints does not start one process each."""
    for lock in (folder, exporter_slot(folder)):
        with export_lock(lock, wait=False) as held:
            if not held:
                return False
    from fss.checkpoint import save_checkpoint

    jobs = cache_root() / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    job = Path(tempfile.mkdtemp(dir=jobs, prefix=f"{folder.name}.")) / "model.pt"
    try:
        save_checkpoint(model, job)
        launch_exporter([sys.executable, "-c", EXPORTER_BOOT, str(job), str(folder), str(size)])
    except BaseException:
        shutil.rmtree(job.parent, ignore_errors=True)
        raise
    return True


def exporter_slot(folder: Path) -> Path:
    """The pseudo cache entry whose lock a background exporter holds while it runs."""
    return folder.with_name("background-exporter")


def launch_exporter(command: list[str]) -> None:
    """Start the exporter; it waits for the end of this process (its stdin, a pipe held here, closes)."""
    BACKGROUND.append(
        subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not stopped by the terminal's Ctrl-C, nor waited for at exit
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    )


BACKGROUND: list = []  # started exporters: their stdin pipes stay open while this process runs


def choose_encoder_path(
    model,
    device: torch.device,
    size: int,
    backend: str = "auto",
    adapting: bool = False,
    images: int | None = None,
    continuing: str | None = None,
) -> EncoderPath:
    """The encoder path for a loaded model on ``device``: ``backend`` ``torch``, ``onnxruntime`` (the
    cached verified export; an error when impossible) or ``auto``: ONNX Runtime on the CPU when a
    verified graph is cached, or when exporting one now pays for itself over the job's ``images``
    encoder passes (``None``: unknown, a long-lived caller); torch otherwise, with the export started
    in the background for the next job. ``continuing`` (``torch`` / ``onnxruntime``): the path of
    earlier results this job completes, which ``auto`` keeps so that all its masks come from one path.
    """
    if backend not in CHOICES:
        raise FssError(f"unknown encoder backend {backend!r}: choose one of {', '.join(CHOICES)}")
    current = getattr(model, "backend", "torch")
    if current != "torch":  # already an exported bundle
        return EncoderPath(model, current, f"{current} (bundle)")
    why_torch = torch_reason(device, backend, adapting)
    if why_torch is None and backend == "auto" and continuing == "torch":
        why_torch = "continuing results made with torch"
    if why_torch is not None:
        if backend == "onnxruntime":
            raise FssError(f"the onnxruntime encoder path is not available: {why_torch}")
        return EncoderPath(model, "torch", f"torch ({why_torch})" if backend == "auto" else "torch")
    needed = backend == "onnxruntime" or continuing == "onnxruntime"  # worth waiting for another exporter
    export_now = needed or export_pays(model, images)
    try:
        folder = cache_folder(model, size)
        check_not_refused(folder)
        bundle = load_verified(folder, model, size)
        if bundle is None and export_now:
            bundle = export_locked(model, folder, size, wait=needed)
        elif bundle is None:
            started = start_background_export(model, folder, size)
            return EncoderPath(model, "torch", f"torch ({BACKGROUND_REASON if started else BUSY_REASON})")
    except Exception as exc:  # auto never fails a model that runs in torch: it says why and runs torch
        if backend == "onnxruntime":
            raise
        reason = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}".splitlines()[0]
        return EncoderPath(model, "torch", f"torch (no verified ONNX graph: {reason})")
    if bundle is None:
        return EncoderPath(model, "torch", "torch (another process is exporting this encoder)")
    return EncoderPath(bundle, "onnxruntime", f"onnxruntime (verified graph cached in {folder})")


BUSY_REASON = "new checkpoint: an ONNX Runtime export is running already, the next run starts this one"
BACKGROUND_REASON = "new checkpoint: its ONNX Runtime graph is exported in the background, for the next run"


def torch_reason(device: torch.device, backend: str, adapting: bool) -> str | None:
    """Why the encoder must run in torch here, or None."""
    if backend == "torch":
        return "asked for"
    if device.type != "cpu":
        return f"on {device.type}"
    if adapting:
        return "adaptation fine-tunes the torch weights"
    if missing := missing_onnx_tools():
        return f"{', '.join(missing)} not installed: pip install 'fss[onnx]' for the ONNX Runtime path"
    return None
