"""The Triton side of ``fss-serve``: two models bound into the Triton Inference Server of PyTriton.

- ``fss_support`` (not batched, one instance): ``op`` = register | add_shot | remove_shot | info;
  outputs the content-hash ``support_id``, the ``classes`` in label order, ``shots`` per class, ``info``
  (JSON) and ``error``.
- ``fss_segment`` (dynamically batched across clients, ``instances`` copies): rows of ``support_id`` +
  ``image`` (encoded bytes) -> ``labels`` (``n x L`` uint8: row k is its ``H x W`` mask, row-major,
  padded with zeros to the request's largest pixel count ``L``), ``size`` (``n x 2``: H, W of each row),
  ``prob`` (the same layout, float32, only when asked for), ``result`` (JSON: classes, presence scores,
  absent classes, objects where ``min_area`` asks for them) and ``error`` per row.

A bad request never fails the batch it shares with other clients: its rows carry ``error`` (one line)
and empty outputs, and no error text is a traceback (details go to the server's log). Protocol errors
(wrong dtype / shape, batch over ``max_batch``) are refused by Triton itself before they reach us.
"""

import json
import os
import signal
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fss.cli_args import load_from_args
from fss.serve import protocol
from fss.serve.handlers import (
    Limits,
    RequestError,
    Row,
    RowResult,
    SegmentService,
    SupportService,
    internal_error,
)
from fss.serve.support_store import SupportStore
from fss.serve.tensors import blobs, bytes_array, one, tensors, text


@dataclass
class ServeConfig:
    ckpt: Path | None = None
    bundle: Path | None = None
    backend: str = "auto"
    device: str = "auto"
    size: int | None = None
    address: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1
    max_batch: int = 8
    max_queue_delay_us: int = 2000
    max_supports: int = 64
    support_root: Path | None = None
    exit_timeout_s: int = 30
    triton_log: Path | None = None
    repository: Path | None = None  # run a model repository (fss-export --triton-repo) instead
    limits: Limits = field(default_factory=Limits)
    min_score: float | None = None  # presence cut-off (None: the checkpoint's)


def python_libdir_env(env: dict) -> dict:
    """``env`` with this interpreter's LIBDIR first on LD_LIBRARY_PATH.

    Triton's Python-backend stub links libpython dynamically; with a pyenv- or source-built Python
    the loader would otherwise find another libpython (or none) and the backend fails to start.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir and libdir not in paths:
        paths.insert(0, libdir)
    return {**env, "LD_LIBRARY_PATH": os.pathsep.join(paths)}


class Services:
    """The model (loaded once), the shared support cache, one registrar and ``instances`` segmenters.

    ``model`` / ``device`` / ``store`` default to ``config``'s model and an in-memory LRU cache; the
    model repository's Python backend passes its own (an encoder behind BLS, a cache on disk).
    """

    def __init__(self, config: ServeConfig, model=None, device=None, store: SupportStore | None = None):
        from fss.runtime.segmenter import Segmenter

        self.config = config
        if model is None:
            model, device = load_from_args(config)  # its fields are fss-serve's model flags
        self.meta = dict(model.meta)
        self.store = store if store is not None else SupportStore(config.max_supports)
        batch = config.max_batch

        def segmenter(store=None):
            return Segmenter(
                model, device=device, size=config.size, batch=batch, store=store, min_score=config.min_score
            )

        self.support = SupportService(segmenter(), self.store, config.limits, config.support_root)
        # Every instance segments every registered set: they share the store.
        self.segmenters = [
            SegmentService(segmenter(self.store), config.limits) for _ in range(config.instances)
        ]
        self.input_size = self.support.seg.size

    def info(self) -> dict:
        c = self.config
        return {
            "model": str(c.bundle or c.ckpt or "bundled demo model"),
            "meta": {k: v for k, v in self.meta.items() if json_safe(v)},
            "input_size": self.input_size,
            "max_batch": c.max_batch,
            "instances": c.instances,
            "max_queue_delay_us": c.max_queue_delay_us,
            "supports_cached": len(self.store),
            "supports_capacity": self.store.capacity,
            "supports_evicted": self.store.evictions,
            "server_side_folders": c.support_root is not None,
            "limits": asdict(c.limits),
        }


def json_safe(value) -> bool:
    """Whether a meta entry travels in ``info``'s JSON (the normalisation does, tensors would not)."""
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def support_reply(described: dict | None = None, info: dict | None = None, error: str = "") -> dict:
    described = described or {"support_id": "", "classes": [], "shots": []}
    return {
        "support_id": bytes_array([described["support_id"]]),
        "classes": bytes_array(described["classes"]),
        "shots": np.array(described["shots"], dtype=np.int32),
        "info": bytes_array([json.dumps(info) if info else ""]),
        "error": bytes_array([error]),
    }


def op_info(services: Services, request) -> dict:
    return support_reply(info=services.info())


def op_register(services: Services, request) -> dict:
    if "folder" in request.data:
        return support_reply(services.support.register_folder(one(request, "folder")))
    missing = [name for name in ("images", "masks", "classes") if name not in request.data]
    if missing:
        raise RequestError(f"register needs inputs images, masks and classes (missing {', '.join(missing)})")
    data = request.data
    return support_reply(
        services.support.register(text(data["classes"]), blobs(data["images"]), blobs(data["masks"]))
    )


def op_add_shot(services: Services, request) -> dict:
    return support_reply(
        services.support.add_shot(
            one(request, "support_id"),
            one(request, "classes"),
            one(request, "images", blobs),
            one(request, "masks", blobs),
        )
    )


def op_remove_shot(services: Services, request) -> dict:
    index = one(request, "index", lambda v: [int(x) for x in np.asarray(v).ravel()])
    return support_reply(
        services.support.remove_shot(one(request, "support_id"), one(request, "classes"), index)
    )


SUPPORT_OPS = {
    protocol.OP_REGISTER: op_register,
    protocol.OP_ADD_SHOT: op_add_shot,
    protocol.OP_REMOVE_SHOT: op_remove_shot,
    protocol.OP_INFO: op_info,
}


def support_call(services: Services, request) -> dict:
    op = one(request, "op")
    if op not in SUPPORT_OPS:
        raise RequestError(f"unknown op {op!r} (one of {', '.join(SUPPORT_OPS)})")
    return SUPPORT_OPS[op](services, request)


def make_support_infer(services: Services):
    def infer(requests):
        replies = []
        for request in requests:
            try:
                replies.append(support_call(services, request))
            except RequestError as err:
                replies.append(support_reply(error=str(err)))
            except Exception as err:  # a server bug must not take the server down: report it, go on
                replies.append(support_reply(error=internal_error("fss_support", err)))
        return replies

    return infer


def wants(request, output: str) -> bool:
    names = request.requested_output_names
    return names is None or output in names


def request_rows(request) -> list[Row]:
    """The rows of one (batched) request: ``support_id`` and ``image`` are ``n x 1``."""
    ids, images = request.data.get("support_id"), request.data.get("image")
    if ids is None or images is None:
        raise RequestError("fss_segment needs inputs support_id and image")
    ids, images = text(ids), blobs(images)
    if len(ids) != len(images):
        raise RequestError(f"{len(ids)} support ids for {len(images)} images")
    with_prob = wants(request, "prob")
    areas = request.data.get("min_area")
    areas = [None] * len(ids) if areas is None else [int(a) or None for a in np.asarray(areas).reshape(-1)]
    if len(areas) != len(ids) or any(a is not None and a < 0 for a in areas):
        raise RequestError(f"min_area: one number of pixels (0 or more) per image, got {len(areas)}")
    return [Row(i, image, with_prob, a) for i, image, a in zip(ids, images, areas, strict=True)]


def segment_reply(
    results: list[RowResult], with_prob: bool, max_pixels: int, with_result: bool = False
) -> dict:
    """Per-row results -> ``n x L`` labels (row k: its ``H x W`` mask flattened, then zeros), sizes, errors.

    Triton sends a request's rows as one tensor, so rows must be padded to a common length. Padding
    flat rows to the largest pixel count (not to the tallest height times the widest width, which a
    400000 x 1 row beside a 1 x 4000 row makes 1.6 G pixels) bounds a reply by ``n x max_pixels``
    values, checked here before allocating: a row over ``max_pixels`` gets an error, its batchmates
    their masks.
    """
    rows = [
        RowResult(error=f"reply: {r.labels.size} pixels, more than the limit of {max_pixels} pixels")
        if r.labels is not None and r.labels.size > max_pixels
        else r
        for r in results
    ]
    shapes = [r.labels.shape if r.labels is not None else (0, 0) for r in rows]
    # At least 1 value per row: PyTriton cannot send an empty tensor (rows that failed carry size 0 x 0).
    length = max(1, *(h * w for h, w in shapes))
    labels = np.zeros((len(rows), length), np.uint8)
    prob = np.zeros((len(rows), length), np.float32) if with_prob else None
    for k, r in enumerate(rows):
        if r.labels is not None:
            labels[k, : r.labels.size] = r.labels.ravel()
            if with_prob:
                prob[k, : r.prob.size] = r.prob.ravel()
    reply = {
        "labels": labels,
        "size": np.array(shapes, dtype=np.int32).reshape(len(rows), 2),
        "error": bytes_array([r.error for r in rows]).reshape(len(rows), 1),
    }
    if with_prob:
        reply["prob"] = prob
    if with_result:
        summaries = [json.dumps(r.summary) if r.summary is not None else "" for r in rows]
        reply["result"] = bytes_array(summaries).reshape(len(rows), 1)
    return reply


def request_size(request) -> int:
    """Rows of a batched request (every input is ``n x ...``)."""
    return max((len(v) for v in request.data.values()), default=1)


def error_reply(request, message: str) -> dict:
    """Every row of ``request`` failed with ``message``."""
    rows = [RowResult(error=message)] * request_size(request)
    return segment_reply(rows, wants(request, "prob"), 1, wants(request, "result"))


def make_segment_infer(service: SegmentService):
    max_pixels = service.limits.max_pixels

    def infer(requests):
        rows, spans, failed = [], [], {}
        for k, request in enumerate(requests):
            own = []
            try:
                own = request_rows(request)
            except RequestError as err:
                failed[k] = str(err)
            except Exception as err:  # a server bug reading this request: the others go on
                failed[k] = internal_error("fss_segment", err)
            spans.append((len(rows), len(rows) + len(own)))
            rows.extend(own)
        try:
            results = service.segment(rows)
        except Exception as err:  # a server bug must not take the server down: every request gets it
            message = internal_error("fss_segment", err)
            failed = {k: message for k in range(len(requests))}
        replies = []
        for k, (request, (start, stop)) in enumerate(zip(requests, spans, strict=True)):
            if k in failed:
                replies.append(error_reply(request, failed[k]))
                continue
            try:
                wanted = wants(request, "prob"), max_pixels, wants(request, "result")
                replies.append(segment_reply(results[start:stop], *wanted))
            except Exception as err:  # e.g. out of memory for this reply: the other requests still get theirs
                replies.append(error_reply(request, internal_error("fss_segment reply", err)))
        return replies

    return infer


def bind_models(triton, services: Services) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig

    c = services.config
    triton.bind(
        model_name=protocol.SUPPORT_MODEL,
        infer_func=make_support_infer(services),
        inputs=tensors(protocol.SUPPORT_INPUTS),
        outputs=tensors(protocol.SUPPORT_OUTPUTS),
        config=ModelConfig(batching=False),
    )
    triton.bind(
        model_name=protocol.SEGMENT_MODEL,
        infer_func=[make_segment_infer(s) for s in services.segmenters],
        inputs=tensors(protocol.SEGMENT_INPUTS),
        outputs=tensors(protocol.SEGMENT_OUTPUTS),
        config=ModelConfig(
            max_batch_size=c.max_batch,
            batcher=DynamicBatcher(max_queue_delay_microseconds=c.max_queue_delay_us),
        ),
    )


def nvml_available() -> bool:
    """Whether NVIDIA's management library loads and finds a driver, as Triton's GPU metrics (DCGM)
    need; without it, DCGM prints "Error: Failed to initialize NVML" at start-up."""
    import ctypes

    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return False
        nvml.nvmlShutdown()
        return True
    except (OSError, AttributeError):
        return False


def triton_config(config: ServeConfig, gpu_metrics: bool = True):
    from pytriton.triton import TritonConfig

    return TritonConfig(
        allow_gpu_metrics=gpu_metrics,
        http_address=config.address,
        http_port=config.http_port,
        grpc_address=config.address,
        grpc_port=config.grpc_port,
        metrics_address=config.address,
        metrics_port=config.metrics_port,
        exit_timeout_secs=config.exit_timeout_s,
        log_file=config.triton_log,
        model_repository=config.repository,
        # A repository's fss_encoder needs backends this server may lack: serve the rest regardless
        # (the head models then run the encoder themselves, see fss.serve.repo_models).
        exit_on_error=False if config.repository is not None else None,
        strict_readiness=False if config.repository is not None else None,
    )


def stop_on_sigterm() -> None:
    """SIGTERM (Kubernetes, systemd) stops like Ctrl-C: Triton refuses new requests, finishes in-flight."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def serve(config: ServeConfig, log=print) -> None:
    """Load the model (or a repository), start Triton on ``config``'s ports, serve until SIGINT / SIGTERM."""
    from pytriton.triton import Triton

    services = None if config.repository is not None else Services(config)
    os.environ.update(python_libdir_env(dict(os.environ)))
    stop_on_sigterm()
    gpu_metrics = nvml_available()
    if not gpu_metrics:
        log("fss-serve: no NVIDIA driver (NVML): Triton's GPU metrics are off, CPU metrics stay on")
    with Triton(config=triton_config(config, gpu_metrics)) as triton:
        if services is not None:
            bind_models(triton, services)
        triton.connect()  # waits until the models are loaded
        what = f"repository {config.repository}" if services is None else f"input size {services.input_size}"
        log(
            f"fss-serve: ready: http://{config.address}:{config.http_port} grpc {config.address}:"
            f"{config.grpc_port} metrics {config.address}:{config.metrics_port} "
            f"(models {protocol.SUPPORT_MODEL}, {protocol.SEGMENT_MODEL}; {what})"
        )
        triton.serve()
