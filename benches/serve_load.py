"""Loopback load test of ``fss-serve``: latency, throughput, memory, correctness and hostile clients.

Starts ``fss-serve`` on 127.0.0.1 (free ports), registers one support set, then:

1. reference masks: ``fss-run`` on the same photos and model; the overhead against an in-process
   ``Segmenter``, one request at a time, alternating the two on the same photos;
2. 1, 4, 16 concurrent clients (threads, one connection each) sending real photos: throughput,
   p50 / p99 latency, every mask compared with ``fss-run``'s;
3. a long run (``--requests``, e.g. 10,000) at 4 clients, sampling the resident memory of the whole
   server (fss-serve, tritonserver, Python-backend stubs) as it goes;
4. hostile requests: malformed JSON, wrong dtype / shape, huge images, unknown ids, corrupt files and
   clients that disconnect mid-request; the server must answer each with an error and keep serving;
5. graceful shutdown: SIGTERM while a request is in flight; the request completes, the exit code is 0.

Every request loop is bounded; nothing leaves the machine. Prints a JSON report (``--json`` saves it).

    python benches/serve_load.py --queries ../shared/data/coco-mini/val2017 --requests 10000
"""

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 5  # requests before timing, on either side


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (from /proc), MiB."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    family, frontier = {pid}, [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, parent in parents.items() if parent == current and p not in family]
        family.update(children)
        frontier.extend(children)
    total = 0
    for member in family:
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def segment_counts(metrics_port: int) -> tuple[float, float]:
    """Triton's counters for fss_segment: (requests served, model executions = formed batches)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    counts = {"nv_inference_request_success": 0.0, "nv_inference_exec_count": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in counts and 'model="fss_segment"' in line:
            counts[name] += float(line.rsplit(" ", 1)[1])
    return counts["nv_inference_request_success"], counts["nv_inference_exec_count"]


def percentiles(latencies: list[float]) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


class ServerProcess:
    def __init__(self, args: list[str], log: Path):
        self.http, self.grpc, self.metrics = free_ports(3)
        ports = [
            "--http-port",
            str(self.http),
            "--grpc-port",
            str(self.grpc),
            "--metrics-port",
            str(self.metrics),
        ]
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fss.serve.cli", *ports, *args],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
        )
        self.url = f"127.0.0.1:{self.http}"

    def wait_ready(self, timeout_s=300) -> float:
        from fss.serve import Client

        start, client = time.monotonic(), Client(self.url)
        while not client.ready():
            if self.process.poll() is not None or time.monotonic() - start > timeout_s:
                raise RuntimeError(f"fss-serve did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        return time.monotonic() - start


def reference_masks(model_args: list[str], support: Path, queries: Path, out: Path) -> dict[str, np.ndarray]:
    from fss.runtime.cli import main as fss_run

    code = fss_run(
        ["--support", str(support), "--query", str(queries), "--out", str(out), "--no-overlays"] + model_args
    )
    if code != 0:
        raise RuntimeError(f"fss-run failed ({code})")
    return {p.stem: np.asarray(Image.open(p)) for p in out.glob("*.png")}


def set_folder_support(seg, folder: Path) -> None:
    """Register a support folder (``fss-run``'s layout) with an in-process Segmenter."""
    from fss.io.folders import find_support_pairs

    pairs = find_support_pairs(folder)
    images = [[image for image, _ in shots] for shots in pairs.values()]
    masks = [[mask for _, mask in shots] for shots in pairs.values()]
    seg.set_support(images, masks, list(pairs))


def paired_overhead(
    model_args: list[str], support: Path, url: str, sid: str, blobs: dict, rounds: int
) -> dict:
    """The same photo through an in-process Segmenter and through the server, alternately.

    Both sides take the file's bytes and return labels (decoding included); alternating them, in an
    order that flips every round, makes both see the same load on a shared machine. The overhead is
    the median of the per-round differences.
    """
    import fss
    from fss.serve import Client

    ckpt = model_args[model_args.index("--ckpt") + 1] if "--ckpt" in model_args else None
    seg = fss.Segmenter(fss.load_model(ckpt))
    set_folder_support(seg, support)
    client = Client(url)

    # Called from a worker thread, as the server calls its Segmenter. (On the shared 2-core machine,
    # calls from Python's main thread ran 5-15x slower: its 2-thread OpenMP regions wait for
    # descheduled threads; worker threads did not.)
    worker = ThreadPoolExecutor(1)

    def local(blob):
        return worker.submit(lambda: seg.segment([Image.open(io.BytesIO(blob)).convert("RGB")])[0]).result()

    def served(blob):
        return client.segment(sid, blob)

    names = sorted(blobs)
    for name in names[:WARMUP]:
        local(blobs[name]), served(blobs[name])
    times = {"in_process": [], "served": []}
    disagreements = 0
    for k in range(rounds):
        blob = blobs[names[k % len(names)]]
        order = [("in_process", local), ("served", served)][:: 1 if k % 2 else -1]
        out = {}
        for side, call in order:
            t = time.perf_counter()
            out[side] = call(blob)
            times[side].append(time.perf_counter() - t)
        disagreements += not np.array_equal(out["in_process"], out["served"])
    client.close()
    report = {
        side: {"mean_ms": round(1000 * float(np.mean(t)), 2), **percentiles(t)} for side, t in times.items()
    }
    diffs = np.array(times["served"]) - np.array(times["in_process"])
    report["rounds"] = rounds
    report["overhead_p50_ms"] = round(1000 * float(np.median(diffs)), 2)
    report["mask_disagreements"] = disagreements
    return report


def load_phase(
    url: str, sid: str, blobs: dict, references: dict, clients: int, requests: int, memory=None
) -> dict:
    """``requests`` segment calls from ``clients`` threads; every mask checked against ``fss-run``'s."""
    from fss.serve import Client

    client = Client(url)
    names = sorted(blobs)
    for name in names[:WARMUP]:
        client.segment(sid, blobs[name])
    latencies, mismatches, errors, samples = [], [], [], []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker():
        while True:
            with lock:
                k = next(counter, None)
            if k is None:
                return
            name = names[k % len(names)]
            t = time.perf_counter()
            try:
                labels = client.segment(sid, blobs[name])
            except Exception as err:  # counted and reported, the loop goes on
                with lock:
                    errors.append(str(err)[:200])
                continue
            elapsed = time.perf_counter() - t
            with lock:
                latencies.append(elapsed)
                if not np.array_equal(labels, references[name]):
                    mismatches.append(name)
                if memory is not None and len(latencies) % memory[1] == 0:
                    samples.append((len(latencies), round(tree_rss_mb(memory[0]), 1)))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    client.close()
    result = {
        "clients": clients,
        "requests": requests,
        "throughput_per_s": round(len(latencies) / wall, 2),
        **percentiles(latencies),
        "mask_mismatches": len(mismatches),
        "errors": len(errors),
        "first_errors": errors[:3],
    }
    if memory is not None:
        result["rss_mb"] = samples
    return result


def raw_http(port: int, body: bytes, headers: dict | None = None, path="/v2/models/fss_segment/infer") -> str:
    """One HTTP request on a fresh connection; the status line and the start of the body."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status, _, rest = reply.partition(b"\r\n")
    return (status.decode() + " " + rest.split(b"\r\n\r\n", 1)[-1][:160].decode(errors="replace")).strip()


def hostile(server: ServerProcess, sid: str, photo: bytes, limits_pixels: int) -> dict:
    """Each bad request once; returns what the server answered."""
    from tritonclient.http import InferInput, InferRequestedOutput

    from fss.serve import Client

    client = Client(server.url)
    answers = {}

    def expect_error(name, call):
        try:
            call()
            answers[name] = "NO ERROR (defect)"
        except Exception as err:
            answers[name] = str(err).splitlines()[0][:200]

    side = int(limits_pixels**0.5) + 64
    huge_pixels = io.BytesIO()
    Image.new("RGB", (side, side)).save(huge_pixels, format="PNG")  # small file, too many pixels
    expect_error("huge image (pixels)", lambda: client.segment(sid, huge_pixels.getvalue()))
    expect_error("huge image (bytes)", lambda: client.segment(sid, os.urandom(17 * 2**20)))
    expect_error("truncated JPEG", lambda: client.segment(sid, photo[: len(photo) // 3]))
    expect_error("not an image", lambda: client.segment(sid, b"GIF89a" + b"\0" * 100))
    expect_error("unknown support id", lambda: Client(server.url).segment("sha256:" + "f" * 64, photo))
    raw = client.connection(0)
    ident = InferInput("support_id", [1, 1], "BYTES")
    ident.set_data_from_numpy(np.array([[sid.encode()]], dtype=object))
    wrong_dtype = InferInput("image", [1, 1], "FP32")
    wrong_dtype.set_data_from_numpy(np.zeros((1, 1), np.float32))
    wrong_shape = InferInput("image", [1, 3], "BYTES")
    wrong_shape.set_data_from_numpy(np.array([[photo, photo, photo]], dtype=object))
    too_many = InferInput("image", [64, 1], "BYTES")
    too_many.set_data_from_numpy(np.array([[b"x"]] * 64, dtype=object))
    ids64 = InferInput("support_id", [64, 1], "BYTES")
    ids64.set_data_from_numpy(np.array([[sid.encode()]] * 64, dtype=object))
    out = [InferRequestedOutput("labels")]
    expect_error("wrong dtype", lambda: raw.infer("fss_segment", [ident, wrong_dtype], outputs=out))
    expect_error("wrong shape", lambda: raw.infer("fss_segment", [ident, wrong_shape], outputs=out))
    expect_error("batch over --max-batch", lambda: raw.infer("fss_segment", [ids64, too_many], outputs=out))
    expect_error("missing input", lambda: raw.infer("fss_segment", [ident], outputs=out))
    expect_error("unknown model", lambda: raw.infer("fss_nothing", [ident], outputs=out))
    answers["malformed JSON"] = raw_http(server.http, b'{"inputs": [ {"name": ')
    answers["JSON of the wrong form"] = raw_http(server.http, b'{"inputs": 7}')
    # Disconnects: half a body, then gone; a full request whose reply nobody reads.
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", server.http)) as sock:
            sock.sendall(
                b"POST /v2/models/fss_segment/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\n\r\n{"
            )
    body = json.dumps(
        {
            "inputs": [
                {"name": "support_id", "shape": [1, 1], "datatype": "BYTES", "data": [sid]},
                {
                    "name": "image",
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(photo) + 4},
                },
            ]
        }
    ).encode()
    payload = body + len(photo).to_bytes(4, "little") + photo
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", server.http)) as sock:
            head = (
                f"POST /v2/models/fss_segment/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n"
                f"Inference-Header-Content-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + payload)  # and close without reading the reply
    answers["disconnects"] = "20 half-sent requests and 20 unread replies"
    client.close()
    return answers


def graceful_shutdown(server: ServerProcess, sid: str, photos: list[bytes]) -> dict:
    from fss.serve import Client

    client, result = Client(server.url), {}

    def request():
        t = time.perf_counter()
        try:
            result["rows"] = len(client.segment_batch(sid, photos))
        except Exception as err:
            result["error"] = str(err)[:200]
        result["latency_s"] = round(time.perf_counter() - t, 3)

    thread = threading.Thread(target=request)
    thread.start()
    time.sleep(0.1)
    server.process.send_signal(signal.SIGTERM)
    thread.join()
    code = server.process.wait(timeout=120)
    return {"in_flight_request": result, "exit_code": code}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, help="model (default: the bundled demo model)")
    p.add_argument("--support", type=Path, default=ROOT / "examples" / "support")
    p.add_argument("--queries", type=Path, default=ROOT / "examples" / "query", help="folder of photos")
    p.add_argument("--phase-requests", type=int, default=200, help="requests per concurrency level")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=10_000, help="requests of the long run (0: skip)")
    p.add_argument("--long-clients", type=int, default=4)
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)

    model_args = ["--ckpt", str(args.ckpt)] if args.ckpt else []
    work = Path(tempfile.mkdtemp(prefix="fss-serve-load-"))
    max_pixels = 4096 * 4096
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count()}
    report["load_average_start"] = os.getloadavg()
    references = reference_masks(model_args, args.support, args.queries, work / "fss-run")
    photos = sorted(p for p in args.queries.iterdir() if p.stem in references)
    blobs = {p.stem: p.read_bytes() for p in photos}
    report["photos"] = len(photos)

    server = ServerProcess(
        [*model_args, "--instances", str(args.instances), "--max-batch", str(args.max_batch)],
        work / "server.log",
    )
    try:
        report["startup_s"] = round(server.wait_ready(), 1)
        from fss.serve import Client

        sid = Client(server.url).register_support(args.support)
        report["phases"] = []
        for n in args.clients:
            requests0, batches0 = segment_counts(server.metrics)
            phase = load_phase(server.url, sid, blobs, references, n, args.phase_requests)
            requests1, batches1 = segment_counts(server.metrics)
            phase["mean_batch"] = round((requests1 - requests0) / max(1.0, batches1 - batches0), 2)
            report["phases"].append(phase)
        report["paired"] = paired_overhead(
            model_args, args.support, server.url, sid, blobs, args.phase_requests
        )
        if args.requests:
            pid = server.process.pid
            before = round(tree_rss_mb(pid), 1)
            long = load_phase(
                server.url,
                sid,
                blobs,
                references,
                args.long_clients,
                args.requests,
                (pid, max(1, args.requests // 10)),
            )
            long["rss_mb_before"] = before
            report["long_run"] = long
        report["hostile"] = hostile(server, sid, blobs[photos[0].stem], max_pixels)
        after = load_phase(server.url, sid, blobs, references, 2, 2 * len(photos))
        report["after_hostile"] = {k: after[k] for k in ("requests", "mask_mismatches", "errors")}
        report["shutdown"] = graceful_shutdown(server, sid, [blobs[p.stem] for p in photos[: args.max_batch]])
    finally:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(timeout=120)
    report["load_average_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    failed = any(ph["mask_mismatches"] or ph["errors"] for ph in report["phases"])
    failed |= report["paired"]["mask_disagreements"] > 0
    failed |= bool(
        report.get("long_run", {}).get("mask_mismatches") or report.get("long_run", {}).get("errors")
    )
    failed |= any(v.startswith("NO ERROR") for v in report["hostile"].values())
    failed |= report["after_hostile"]["mask_mismatches"] > 0 or report["after_hostile"]["errors"] > 0
    failed |= report["shutdown"]["exit_code"] != 0 or "error" in report["shutdown"]["in_flight_request"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
