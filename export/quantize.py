"""An int8 encoder beside the float32 one (opt-in): ONNX Runtime static quantisation on real photos.

The float32 graph is prepared by ONNX Runtime's pre-processing (shape inference, folding), then
quantised in the QDQ format: weights int8, symmetric, per output channel; activations uint8 with
ranges calibrated (MinMax) on the encoder's activations over the given photos, resized and
normalised as the runtime does. ONNX Runtime runs the graph with exact integer products on every
x86-64 CPU, VNNI or not (:func:`fss.backends.sessions.needs_exact_int8_entry`). int8 features are not
held to the float32 tolerance: the bundle records how far they are from eager PyTorch (``verify``'s
measure) and refuses only a graph beyond :data:`fss.export.verify.TOLERANCE` ``["int8"]``, which a
working quantisation stays well inside; mask agreement and held-out mean-IoU are measured in
docs/performance.md.
"""

import tempfile
from pathlib import Path

import torch

from fss.errors import FssError

INT8_FILE = "encoder-int8.onnx"
MAX_CALIBRATION_PHOTOS = 64
QUANTISATION = {
    "format": "QDQ",
    "weights": "int8, symmetric, per channel",
    "activations": "uint8",
    "calibration": "MinMax",
    "x86_kernels": "exact: VNNI where the CPU has it, else u8u8 (session.x64quantprecision=1)",
}


def calibration_photos(folder) -> list[Path]:
    """Up to :data:`MAX_CALIBRATION_PHOTOS` images under ``folder`` (recursively), evenly spread; a PNG
    beside an image of the same stem is a support mask (fss-run's layout) and left out."""
    from fss.io.folders import IMAGE_EXTS

    folder = Path(folder)
    if not folder.is_dir():
        raise FssError("calibration folder not found", folder)
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    stems = {}
    for path in images:
        stems.setdefault(path.with_suffix(""), []).append(path)
    photos = [p for p in images if not (p.suffix.lower() == ".png" and len(stems[p.with_suffix("")]) > 1)]
    if not photos:
        raise FssError("calibration folder has no images", folder)
    step = max(1, len(photos) // MAX_CALIBRATION_PHOTOS)
    return photos[::step][:MAX_CALIBRATION_PHOTOS]


def calibration_batches(photos: list[Path], size: int, normalisation: dict) -> list[torch.Tensor]:
    """``1 x 3 x size x size`` normalised tensors of the photos, as the runtime feeds the encoder."""
    from fss.io.images import read_image
    from fss.io.tensors import image_tensor

    return [image_tensor(read_image(path), size, normalisation)[None] for path in photos]


def quantize_encoder(fp32_path: Path, out_path: Path, batches: list[torch.Tensor]) -> None:
    """Write the int8 QDQ graph of ``fp32_path`` to ``out_path``, calibrated on ``batches``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from fss.export.onnx import INPUT_NAME, quiet_exporter

    class Photos(CalibrationDataReader):
        def __init__(self):
            self.remaining = iter(batches)

        def get_next(self):
            batch = next(self.remaining, None)
            return None if batch is None else {INPUT_NAME: batch.numpy()}

    with tempfile.TemporaryDirectory() as scratch, quiet_exporter():
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(out_path),
            Photos(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
        )
