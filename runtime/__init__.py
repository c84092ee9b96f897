"""The low-latency runtime: a support set registered once, queries segmented many times."""

from fss.runtime.segmenter import Segmenter

__all__ = ["Segmenter"]
