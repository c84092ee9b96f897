"""Hostile and unusual inputs for the reliability tests: 16-bit PNGs, EXIF-rotated JPEGs, pixel bombs."""

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def save_png16_rgb(path: Path, pixels: np.ndarray) -> None:
    """``H x W x 3`` uint16 as a 48-bit RGB PNG (Pillow cannot write those)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def save_png16_grey(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"


def save_pixel_bomb(path: Path, side: int = 12500) -> None:
    """A valid, small greyscale PNG of ``side x side`` black pixels (12500: 156 M pixels in ~150 KB)."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    deflate = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    parts = [deflate.compress(row) for _ in range(side)]
    data = b"".join(parts) + deflate.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")
    )


def save_rotated_jpeg(path: Path, pixels: np.ndarray, orientation: int = 6) -> None:
    """Stored pixels with an EXIF orientation tag (6: displayed turned 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())
