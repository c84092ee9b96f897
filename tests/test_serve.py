"""fss-serve: the handlers against Segmenter (no server), then two real Triton servers on loopback."""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import random_model
from PIL import Image

import fss
from fss.serve import protocol
from fss.serve.handlers import (
    Limits,
    RequestError,
    Row,
    SegmentService,
    SupportService,
    decode_image,
)
from fss.serve.support_store import SupportStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def encoded(array: np.ndarray, fmt="PNG", mode=None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt)
    return buffer.getvalue()


def support_files(folder=EXAMPLES / "support"):
    from fss.serve.client import read_support_folder

    return read_support_folder(folder)


def queries() -> list[Path]:
    return sorted((EXAMPLES / "query").glob("*.jpg"))


# -- without a server -----------------------------------------------------------------------------
def test_support_ids_are_content_hashes():
    a = protocol.support_id(["bus", "pizza"], [["x", "y"], ["z"]])
    assert a == protocol.support_id(["bus", "pizza"], [["x", "y"], ["z"]])
    assert a.startswith(protocol.ID_PREFIX)
    others = [
        protocol.support_id(["pizza", "bus"], [["z"], ["x", "y"]]),  # label order matters
        protocol.support_id(["bus", "pizza"], [["y", "x"], ["z"]]),
        protocol.support_id(["bus", "pizza"], [["x"], ["z"]]),
    ]
    assert a not in others
    assert protocol.shot_digest(b"img", b"mask") != protocol.shot_digest(b"im", b"gmask")


def test_support_store_is_a_bounded_lru():
    store = SupportStore(2)
    store.put("a", 1, [["s"]])
    store.put("b", 2, [["s"]])
    assert store["a"] == 1  # touch: b is now the oldest
    store.put("c", 3, [["s"]])
    assert "b" not in store and set(store) == {"a", "c"} and store.evictions == 1
    with pytest.raises(KeyError):
        store.shots("b")
    with pytest.raises(TypeError):
        store["d"] = 4


def test_decoding_limits_are_checked_from_the_header():
    limits = Limits(max_image_bytes=50_000, max_pixels=100 * 100)
    good = encoded(np.zeros((100, 100, 3), np.uint8))
    assert decode_image(good, limits).size == (100, 100)
    cases = {
        b"": "empty",
        b"not an image": "not a readable image",
        encoded(np.zeros((101, 100, 3), np.uint8)): "more than the limit of 10000 pixels",
        encoded(np.zeros((64, 64, 3), np.uint8), fmt="GIF"): "format GIF not accepted",
        good[:60]: "unreadable or corrupt",
        os.urandom(60_000): "more than the limit of 50000",
    }
    for data, message in cases.items():
        with pytest.raises(RequestError, match=message):
            decode_image(data, limits)


def small_method_model(method: str):
    """A small random model at 65 px of each kind fss-serve runs: prototypes, a learned head (SST), a
    conditioning branch (OSLSM)."""
    if method == "sst":
        from test_sst import tiny_sst

        model = tiny_sst()
        model.meta["input_size"] = 65
        return model
    if method == "oslsm":
        from test_oslsm import tiny_oslsm

        return tiny_oslsm(input_size=65)
    return random_model(width=0.125, input_size=65)


@pytest.fixture(scope="module", params=["panet", "sst", "oslsm"])
def small_model(request):
    return small_method_model(request.param)


@pytest.fixture(scope="module")
def services(small_model):
    store = SupportStore(8)
    support = SupportService(fss.Segmenter(small_model), store, Limits())
    seg = fss.Segmenter(small_model, store=store)
    return support, SegmentService(seg, Limits())


def reference_segmenter(model, classes, images, masks) -> fss.Segmenter:
    """The in-process Segmenter with the same shots, read from the same bytes as fss-run reads files."""
    from fss.io.images import read_image
    from fss.io.masks import read_mask

    seg = fss.Segmenter(model)
    names = list(dict.fromkeys(classes))
    pick = [[k for k, c in enumerate(classes) if c == name] for name in names]
    seg.set_support(
        [[read_image(io.BytesIO(images[k])) for k in ks] for ks in pick],
        [[read_mask(io.BytesIO(masks[k])) for k in ks] for ks in pick],
        names,
    )
    return seg


def test_services_segment_as_the_segmenter(small_model, services):
    support, segment = services
    classes, images, masks = support_files()
    described = support.register(classes, images, masks)
    assert described["classes"] == ["bus", "pizza"] and described["shots"] == [2, 2]
    assert support.register(classes, images, masks) == described  # cached: same id, nothing encoded
    reference = reference_segmenter(small_model, classes, images, masks)
    rows = [Row(described["support_id"], q.read_bytes(), with_prob=True) for q in queries()]
    rows.insert(1, Row(described["support_id"], b"broken", with_prob=True))
    rows.append(Row("sha256:unknown", queries()[0].read_bytes(), with_prob=False))
    results = segment.segment(rows)
    assert "not a readable image" in results[1].error and results[1].labels is None
    assert results[-1].error.startswith(protocol.UNKNOWN_SUPPORT)
    good = [r for r in results if not r.error]
    expected_labels, expected_prob = reference.segment(queries(), return_prob=True)
    for result, labels, prob in zip(good, expected_labels, expected_prob, strict=True):
        np.testing.assert_array_equal(result.labels, labels)
        np.testing.assert_array_equal(result.prob, prob)


def test_rows_carry_classes_presence_scores_and_objects(small_model, services):
    """A row's summary (the ``result`` output) is Segmenter.predict's: classes by name, scores, objects."""
    from fss.serve.server import RowResult, segment_reply

    support, segment = services
    classes, images, masks = support_files()
    order = [2, 3, 0, 1]  # pizza shots first: labels still follow name order
    described = support.register(*([x[k] for k in order] for x in (classes, images, masks)))
    assert described["classes"] == ["bus", "pizza"]
    reference = reference_segmenter(small_model, classes, images, masks)
    rows = [Row(described["support_id"], q.read_bytes(), False, min_area=4) for q in queries()]
    results = segment.segment(rows)
    for result, query in zip(results, queries(), strict=True):
        expected = reference.predict(query, instances=True, min_area=4)
        np.testing.assert_array_equal(result.labels, expected.labels)
        assert result.summary == expected.summary() and result.summary["score"].keys() == {"bus", "pizza"}
    reply = segment_reply([*results, RowResult(error="x")], False, 10**8, with_result=True)
    assert json.loads(reply["result"][0, 0].decode()) == results[0].summary
    assert reply["result"][len(results), 0] == b""  # a failed row has no summary


def test_shot_edits_make_new_ids_and_match_the_segmenter(small_model, services):
    support, segment = services
    classes, images, masks = support_files()
    base = support.register(classes, images, masks)["support_id"]
    extra_image, extra_mask = images[2], masks[2]  # a pizza shot, added to bus as well
    added = support.add_shot(base, "bus", extra_image, extra_mask)
    assert added["shots"] == [3, 2] and added["support_id"] != base
    # The id of an edited set is the id of registering that content directly.
    direct = support.register([*classes, "bus"], [*images, extra_image], [*masks, extra_mask])
    assert direct["support_id"] == added["support_id"]
    reference = reference_segmenter(small_model, classes, images, masks)
    from fss.io.images import read_image
    from fss.io.masks import read_mask

    reference.add_shot("bus", read_image(io.BytesIO(extra_image)), read_mask(io.BytesIO(extra_mask)))
    rows = [Row(added["support_id"], q.read_bytes(), False) for q in queries()]
    for result, labels in zip(segment.segment(rows), reference.segment(queries()), strict=True):
        np.testing.assert_array_equal(result.labels, labels)
    removed = support.remove_shot(added["support_id"], "bus", -1)
    assert removed["support_id"] == base
    new_class = support.add_shot(base, "bus2", images[0], masks[0])
    assert new_class["classes"] == ["bus", "bus2", "pizza"]  # label order: name order
    with pytest.raises(RequestError, match="only shot"):
        support.remove_shot(new_class["support_id"], "bus2", 0)
    with pytest.raises(RequestError, match="no class"):
        support.remove_shot(base, "cat", 0)
    with pytest.raises(RequestError, match=protocol.UNKNOWN_SUPPORT):
        support.add_shot("sha256:nope", "bus", images[0], masks[0])


def test_bad_support_sets_are_refused_with_what_is_wrong(services):
    support, _ = services
    classes, images, masks = support_files()
    empty_mask = encoded(np.zeros((Image.open(io.BytesIO(images[0])).height, 10), np.uint8))
    cases = [
        (([], [], []), "at least one shot"),
        ((classes[:1], images[:1], masks[:2]), "one mask and one class name per image"),
        ((classes[:1], images[:1], [empty_mask]), "mask size"),
        ((["bus"], images[:1], [encoded(np.zeros((427, 640), np.uint8))]), "no foreground|mask size"),
        (([""], images[:1], masks[:1]), "class names"),
    ]
    for args, message in cases:
        with pytest.raises(RequestError, match=message):
            support.register(*args)
    with pytest.raises(RequestError, match="disabled"):
        support.register_folder("support")


def test_server_side_folders_stay_below_the_root(small_model, tmp_path):
    service = SupportService(fss.Segmenter(small_model), SupportStore(2), Limits(), support_root=EXAMPLES)
    assert service.register_folder("support")["classes"] == ["bus", "pizza"]
    with pytest.raises(RequestError, match="outside"):
        service.register_folder("../tests")
    with pytest.raises(RequestError, match="not found"):
        service.register_folder("nothing-here")


def test_support_root_refuses_links_that_lead_outside(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(EXAMPLES / "support", root / "support")
    shutil.copytree(EXAMPLES / "support" / "bus", outside / "bus")
    model = random_model(width=0.125, input_size=65)
    service = SupportService(fss.Segmenter(model), SupportStore(2), Limits(), support_root=root)
    expected = service.register_folder("support")
    bus = root / "support" / "bus"
    image = sorted(p for p in bus.iterdir() if p.suffix == ".jpg")[0]
    mask = bus / f"{image.stem}.png"

    def refused():
        with pytest.raises(RequestError, match="leads outside the support root") as caught:
            service.register_folder("support")
        assert str(outside) not in str(caught.value) and "/etc" not in str(caught.value)

    (root / "support" / "car").symlink_to(outside / "bus", target_is_directory=True)  # a class folder
    refused()
    (root / "support" / "car").unlink()
    inside_copy = root / "kept.jpg"
    shutil.move(image, inside_copy)
    image.symlink_to(inside_copy)  # a link that stays inside the root is read
    assert service.register_folder("support") == expected
    image.unlink()
    image.symlink_to(next((outside / "bus").glob("*.jpg")))  # an image from outside the root
    refused()
    image.unlink()
    shutil.move(inside_copy, image)
    mask.unlink()
    mask.symlink_to("/etc/hostname")  # a system file
    refused()


def test_class_names_follow_fss_run_rules():
    service = SupportService(
        fss.Segmenter(random_model(width=0.125, input_size=65)), SupportStore(2), Limits(max_shots=300), None
    )
    shot = (b"never decoded", b"never decoded")
    for names in (["background"], ["bus", "Background"], [f"c{k}" for k in range(255)]):
        with pytest.raises(RequestError, match="collides with label 0|more than the 254") as caught:
            service.register(names, [shot[0]] * len(names), [shot[1]] * len(names))
        assert "\n" not in str(caught.value)
    classes, images, masks = support_files()
    registered = service.register(classes, images, masks)
    with pytest.raises(RequestError, match="collides with label 0"):
        service.add_shot(registered["support_id"], "background", images[0], masks[0])


class FakeRequest:
    """A Triton request as the infer functions read one."""

    def __init__(self, data: dict, outputs=None):
        self.data = data
        self.requested_output_names = outputs


def segment_request(support_id: str, images: list[bytes], outputs=None) -> FakeRequest:
    n = len(images)
    data = {
        "support_id": np.array([[support_id.encode()]] * n, dtype=object),
        "image": np.array([[i] for i in images], dtype=object),
    }
    return FakeRequest(data, outputs)


def crop(reply: dict, k: int, name="labels") -> np.ndarray:
    h, w = reply["size"][k]
    return reply[name][k, : h * w].reshape(h, w)


def test_replies_pad_flat_rows_and_never_the_cross_product():
    from fss.serve.server import RowResult, segment_reply

    tall, wide = np.ones((16_000_000, 1), np.uint8), np.full((1, 16_000_000), 2, np.uint8)
    reply = segment_reply([RowResult(labels=tall), RowResult(labels=wide)], False, 16_000_000)
    assert reply["labels"].shape == (2, 16_000_000)  # 32 MB, where H x W padding asked for 512 TB
    assert (crop(reply, 0) == tall).all() and (crop(reply, 1) == wide).all()
    square = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rows = [RowResult(labels=square, prob=square / 12), RowResult(error="query image: x"), RowResult()]
    rows[2].labels, rows[2].prob = np.ones((40, 1), np.uint8), np.ones((40, 1), np.float32)
    reply = segment_reply(rows, True, 30)  # the 40-pixel row is over a 30-pixel limit
    assert reply["labels"].shape == reply["prob"].shape == (3, 12)
    np.testing.assert_array_equal(crop(reply, 0), square)
    np.testing.assert_array_equal(crop(reply, 0, "prob"), (square / 12).astype(np.float32))
    assert [e[0].decode() for e in reply["error"]] == [
        "",
        "query image: x",
        "reply: 40 pixels, more than the limit of 30 pixels",
    ]
    assert reply["size"].tolist() == [[3, 4], [0, 0], [0, 0]]


def test_a_hostile_batch_fails_alone_and_errors_carry_no_traceback(caplog):
    from fss.serve.server import make_segment_infer, make_support_infer

    model = random_model(width=0.125, input_size=65)
    store = SupportStore(2)
    support = SupportService(fss.Segmenter(model), store, Limits())
    seg = fss.Segmenter(model, store=store)
    service = SegmentService(seg, Limits(max_pixels=400_000))
    sid = support.register(*support_files())["support_id"]
    query = queries()[0].read_bytes()
    tall, wide = encoded(np.zeros((400_000, 1), np.uint8)), encoded(np.zeros((1, 4000), np.uint8))
    infer = make_segment_infer(service)
    expected = seg.segment([decode_image(query, Limits())], sid)[0]
    replies = infer([segment_request(sid, [tall, wide, query]), segment_request(sid, [query])])
    assert [r["labels"].shape for r in replies] == [(3, 400_000), (1, expected.size)]
    assert [tuple(s) for s in replies[0]["size"]] == [(400_000, 1), (1, 4000), expected.shape]
    for reply, k in ((replies[0], 2), (replies[1], 0)):
        np.testing.assert_array_equal(crop(reply, k), expected)

    # A server bug in one support set's group, or in decoding one row: only those rows fail.
    broken = "sha256:" + "f" * 64
    run_group = service.run_group
    service.run_group = lambda support_id, *args: run_group(support_id, *args) if support_id == sid else 1 / 0
    replies = infer([segment_request(broken, [query]), segment_request(sid, [query])])
    np.testing.assert_array_equal(crop(replies[1], 0), expected)
    service.run_group = run_group
    service.load = lambda row: (_ for _ in ()).throw(MemoryError("Unable to allocate\n  File x"))
    replies.append(infer([segment_request(sid, [query])])[0])
    service.segment = lambda rows: 1 / 0
    replies.append(infer([segment_request(sid, [query])])[0])
    errors = [r["error"][0, 0].decode() for r in replies if r["error"][0, 0]]
    assert errors == [
        "internal error in fss_segment (ZeroDivisionError); details are in the server's log",
        "internal error in fss_segment decoding (MemoryError); details are in the server's log",
        "internal error in fss_segment (ZeroDivisionError); details are in the server's log",
    ]
    assert "Traceback" in caplog.text  # the details are in the server's log

    # op=register with no shots, as the handlers see it (PyTriton's own proxy is another matter).
    empty = np.array([], dtype=object)
    request = FakeRequest({"op": np.array([b"register"], dtype=object), "images": empty, "masks": empty})
    request.data["classes"] = empty
    reply = make_support_infer(type("S", (), {"support": support})())([request])[0]
    assert reply["error"][0].decode() == "a support set needs at least one shot (image + mask + class name)"


def test_server_gets_the_interpreter_libdir():
    import sysconfig

    from fss.serve.server import python_libdir_env

    env = python_libdir_env({"LD_LIBRARY_PATH": "/x"})
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [sysconfig.get_config_var("LIBDIR"), "/x"]
    assert python_libdir_env(env) == env


# -- real servers ---------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Server:
    """``fss-serve ARGS`` on free loopback ports, its stderr in ``log``."""

    def __init__(self, log: Path, *args: str):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log = log
        ports = [
            "--http-port",
            str(self.http),
            "--grpc-port",
            str(self.grpc),
            "--metrics-port",
            str(self.metrics),
        ]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fss.serve.cli", *ports, *args],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        self.url = f"127.0.0.1:{self.http}"

    def wait_ready(self, timeout_s=180):
        from fss.serve import Client

        client = Client(self.url)
        deadline = time.monotonic() + timeout_s
        while not client.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fss-serve did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return -9


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    pytest.importorskip("pytriton", reason="fss[serve] not installed")
    pytest.importorskip("tritonclient.http", reason="fss[serve] not installed")
    tmp = tmp_path_factory.mktemp("serve")
    ckpt = tmp / "small.pt"
    fss.save_checkpoint(random_model(width=0.125, input_size=65), ckpt)
    pair = [
        Server(tmp / f"server{k}.log", "--ckpt", str(ckpt), "--max-pixels", str(1000 * 1000))
        for k in range(2)
    ]
    try:
        for server in pair:
            server.wait_ready()
        yield ckpt, pair
    finally:
        codes = [server.stop() for server in pair]
    assert codes == [0, 0], [server.log.read_text()[-2000:] for server in pair]
    assert all("fss-serve: stopped" in server.log.read_text() for server in pair)


def fss_run_masks(ckpt: Path, out: Path) -> dict[str, np.ndarray]:
    from fss.runtime.cli import main as fss_run

    assert (
        fss_run(
            ["--support", str(EXAMPLES / "support"), "--query", str(EXAMPLES / "query")]
            + ["--ckpt", str(ckpt), "--out", str(out), "--no-overlays"]
        )
        == 0
    )
    return {q.name: np.asarray(Image.open(out / f"{q.stem}.png")) for q in queries()}


def test_serve_segments_as_fss_run_over_http_and_grpc(servers, tmp_path):
    from fss.serve import Client

    ckpt, (server, _) = servers
    expected = fss_run_masks(ckpt, tmp_path / "out")
    for url in (server.url, f"grpc://127.0.0.1:{server.grpc}"):
        client = Client(url)
        sid = client.register_support(EXAMPLES / "support")
        assert client.classes(sid) == ["bus", "pizza"]
        for query in queries():
            labels = client.segment(sid, query.read_bytes())
            assert labels.dtype == np.uint8
            np.testing.assert_array_equal(labels, expected[query.name])
        labels, prob = client.segment(sid, queries()[0].read_bytes(), with_prob=True)
        assert prob.shape == labels.shape and prob.dtype == np.float32 and 0 < prob.min() <= prob.max() <= 1
        result = client.predict(sid, queries()[0].read_bytes(), instances=True, min_area=4)
        np.testing.assert_array_equal(result.labels, expected[queries()[0].name])
        assert result.classes == ["bus", "pizza"] and result.scores.shape == (2,)
        for instance in result.instances:  # masks decoded from the server's RLE
            assert (result.labels[instance.mask] == instance.label).all()
            assert instance.mask.sum() == instance.area
        batch = client.segment_batch(sid, [q.read_bytes() for q in queries()])  # padded, then cropped
        for labels, query in zip(batch, queries(), strict=True):
            np.testing.assert_array_equal(labels, expected[query.name])
    info = Client(server.url).info()
    assert info["input_size"] == 65 and info["supports_cached"] >= 1


def test_bad_requests_get_one_line_errors_and_the_server_keeps_serving(servers):
    from tritonclient.http import InferInput, InferRequestedOutput

    from fss.serve import Client, ServeError

    _, (server, _) = servers
    client = Client(server.url)
    sid = client.register_support(EXAMPLES / "support")
    before = client.segment(sid, queries()[0].read_bytes())
    huge = encoded(np.zeros((1001, 1000, 3), np.uint8))
    cases = [
        (lambda: client.segment(sid, b"\x89PNG broken"), "not a readable image"),
        (lambda: client.segment(sid, huge), "more than the limit of 1000000 pixels"),
        (
            lambda: Client(server.url).segment("sha256:" + "0" * 64, queries()[0].read_bytes()),
            "unknown support",
        ),
        (lambda: client.support_op("shrink"), "unknown op"),
        (lambda: client.register(["bus"], [queries()[0].read_bytes()], [b"x"]), "mask: not a readable"),
        (lambda: client.remove_shot(sid, "bus", 7), "has 2 shots"),
        (lambda: client.register([], [], []), "at least one shot"),
        (lambda: client.register(["background"], [b"x"], [b"x"]), "collides with label 0"),
    ]
    for call, message in cases:
        with pytest.raises(ServeError, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)
    # Protocol errors are Triton's own: wrong dtype, wrong shape, an unknown input.
    raw = client.connection(0)
    wrong_dtype = InferInput("image", [1, 1], "FP32")
    wrong_dtype.set_data_from_numpy(np.zeros((1, 1), np.float32))
    wrong_shape = InferInput("image", [1, 2], "BYTES")
    wrong_shape.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=object))
    ident = InferInput("support_id", [1, 1], "BYTES")
    ident.set_data_from_numpy(np.array([[sid.encode()]], dtype=object))
    for tensor in (wrong_dtype, wrong_shape):
        with pytest.raises(Exception, match="data-type|shape"):
            raw.infer(protocol.SEGMENT_MODEL, [ident, tensor], outputs=[InferRequestedOutput("labels")])
    # A client that sends half a request and goes away.
    with socket.create_connection(("127.0.0.1", server.http)) as sock:
        sock.sendall(
            b"POST /v2/models/fss_segment/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{"
        )
    assert client.ready()
    np.testing.assert_array_equal(client.segment(sid, queries()[0].read_bytes()), before)
    # Rows at the pixel limit, one tall, one wide: padded to H x W they made a 2 TB reply.
    tall, wide = encoded(np.zeros((1_000_000, 1), np.uint8)), encoded(np.zeros((1, 1_000_000), np.uint8))
    masks = client.segment_batch(sid, [tall, wide, queries()[0].read_bytes()])
    assert [m.shape for m in masks[:2]] == [(1_000_000, 1), (1, 1_000_000)]
    np.testing.assert_array_equal(masks[2], before)
    assert client.ready()


def test_a_replica_that_never_saw_the_set_gets_it_transparently(servers):
    from fss.serve import Client

    _, (a, b) = servers
    classes, images, masks = support_files()
    expected = Client(a.url)
    sid = expected.register(classes, images, masks)
    reference = [expected.segment(sid, q.read_bytes()) for q in queries()]
    fresh_id = protocol.support_id(
        ["bus", "pizza"],
        [
            [protocol.shot_digest(i, m) for c, i, m in zip(classes, images, masks, strict=True) if c == n]
            for n in ("bus", "pizza")
        ],
    )
    assert fresh_id == sid  # clients can compute ids without a server
    both = Client([a.url, b.url])  # round robin: the second request reaches the other replica
    assert both.register(classes, images, masks) == sid
    for _ in range(2):
        for query, labels in zip(queries(), reference, strict=True):
            np.testing.assert_array_equal(both.segment(sid, query.read_bytes()), labels)
    assert both.reregistrations == 1
    added = both.add_shot(sid, "bus", images[2], masks[2])
    assert Client(a.url).register([*classes, "bus"], [*images, images[2]], [*masks, masks[2]]) == added


def doc_block(marker: str) -> list[str]:
    """The lines of docs/serving.md's bash block that holds ``marker``."""
    text = (ROOT / "docs" / "serving.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
    return [b for b in blocks if marker in b][0].splitlines()


def post_doc_request(server, block: list[str], workdir: Path, before: list[str]) -> dict:
    """A documented curl request: its shell lines run in ``sh`` as written, the body they build is
    POSTed with urllib to the documented path on ``server``; the JSON reply."""
    import json
    import re
    import urllib.request

    first_curl = next(k for k, line in enumerate(block) if line.startswith("curl "))
    curl = " ".join(block[first_curl:])
    script = [*before, *block[:first_curl], 'printf "%s" "${#HEADER}" > header.length']
    subprocess.run(["sh", "-ec", "\n".join(script)], cwd=workdir, check=True)
    assert '-H "Inference-Header-Content-Length: ${#HEADER}"' in curl
    body = (workdir / re.search(r"--data-binary @(\S+)", curl)[1]).read_bytes()
    path = re.search(r"127\.0\.0\.1:8000(/v2/\S+/infer)", curl)[1]
    request = urllib.request.Request(
        f"http://{server.url}{path}",
        data=body,
        headers={"Inference-Header-Content-Length": (workdir / "header.length").read_text()},
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return {o["name"]: o["data"] for o in json.loads(reply.read())["outputs"]}


def test_the_documented_curl_requests_register_and_segment(servers, tmp_path):
    """docs/serving.md's requests without Python (images and masks as BYTES) against a real server."""
    from fss.serve import Client
    from fss.serve.server import nvml_available

    ckpt, (server, _) = servers
    (tmp_path / "examples").symlink_to(EXAMPLES)
    register, segment = doc_block("register.bin"), doc_block("request.bin")
    reply = post_doc_request(server, register, tmp_path, [])
    client, support = Client(server.url), EXAMPLES / "support"
    stems = {"bus": "bus/000000423617", "pizza": "pizza/000000121647"}
    sid = client.register(
        ["bus", "pizza"],
        [(support / f"{stem}.jpg").read_bytes() for stem in stems.values()],
        [(support / f"{stem}.png").read_bytes() for stem in stems.values()],
    )
    assert reply == {"support_id": [sid], "classes": ["bus", "pizza"], "shots": [1, 1], "error": [""]}
    shell = [line for line in register if not line.startswith(("curl ", "  127."))]
    reply = post_doc_request(server, segment, tmp_path, [*shell, f"SID={sid}"])
    height, width = reply["size"]
    labels = np.array(reply["labels"][: height * width], np.uint8).reshape(height, width)
    np.testing.assert_array_equal(labels, client.segment(sid, queries()[0].read_bytes()))
    assert reply["error"] == [""] and 0 < (labels > 0).mean() < 1
    log = server.log.read_text()
    if not nvml_available():  # a CPU machine: no "Failed to initialize NVML" from Triton's GPU metrics
        assert "NVML" not in log.replace("no NVIDIA driver (NVML)", ""), log[:3000]


def test_the_page_segments_through_fss_serve(servers, tmp_path):
    """``fss-demo --server``: the page's session on a RemoteEngine gives fss-run's masks."""
    from fss.demo.outputs import model_line
    from fss.demo.remote import RemoteEngine
    from fss.demo.session import Session, read_mask_file, read_uploaded_image
    from fss.io.folders import find_support_pairs

    ckpt, (server, _) = servers
    engine = RemoteEngine(server.url, batch=2)
    assert engine.size == 65 and server.url in engine.where
    assert "mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]" in model_line(engine)
    session = Session(engine)
    session.add_queries(queries())
    pairs = find_support_pairs(EXAMPLES / "support")
    shots = {}
    for name in ("pizza", "bus"):  # bus sorts first: the set is registered again in fss-run's order
        for image_path, mask_path in pairs[name]:
            image = read_uploaded_image(image_path)
            shots.setdefault(name, []).append((image, read_mask_file(mask_path, image.size)))
            session.add_shot(name, *shots[name][-1])
    expected = fss_run_masks(ckpt, tmp_path / "out")
    for query in queries():
        np.testing.assert_array_equal(session.queries[query.stem].labels, expected[query.name])
    session.remove_shot("bus", 0)
    seg = fss.Segmenter(fss.load_model(ckpt), device="cpu")
    kept = {"bus": shots["bus"][1:], "pizza": shots["pizza"]}
    images, masks = ([[shot[k] for shot in kept[n]] for n in kept] for k in (0, 1))
    seg.set_support(images, masks, list(kept))
    for query, labels in zip(queries(), seg.segment(queries()), strict=True):
        np.testing.assert_array_equal(session.queries[query.stem].labels, labels)
    session.close()


def test_fss_serve_refuses_bad_arguments_in_one_line(tmp_path):
    from fss.serve.cli import main

    cases = [
        (["--ckpt", str(tmp_path / "missing.pt")], "checkpoint not found"),
        (["--support-root", str(tmp_path / "nope")], "--support-root is not a folder"),
    ]
    for argv, message in cases:
        err = io.StringIO()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "stderr", err)
            assert main(argv) == 2
        assert err.getvalue().startswith("fss-serve: error: ") and message in err.getvalue()
        assert err.getvalue().count("\n") == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        err = io.StringIO()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "stderr", err)
            assert main(["--http-port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen on" in err.getvalue()


# -- the model repository ---------------------------------------------------------------------------
# Stands in for Triton's ONNX Runtime backend, which PyTriton's bundled server lacks: the same graph
# in ONNX Runtime, as a Python-backend model, so the head models reach it through BLS as in production.
ONNX_STAND_IN = """
from pathlib import Path

import onnxruntime
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        version = Path(args["model_repository"]) / args["model_version"]
        self.session = onnxruntime.InferenceSession(str(version / "encoder.onnx"))

    def execute(self, requests):
        replies = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "images").as_numpy()
            (features,) = self.session.run(["features"], {"images": images})
            replies.append(pb_utils.InferenceResponse([pb_utils.Tensor("features", features)]))
        return replies
"""


@pytest.mark.parametrize("method", ["panet", "sst", "oslsm"])
def test_fss_export_writes_a_triton_repository_that_triton_serves(method, tmp_path):
    pytest.importorskip("pytriton", reason="fss[serve] not installed")
    pytest.importorskip("onnxruntime", reason="fss[onnx] not installed")
    from fss.export.cli import main as fss_export
    from fss.runtime.cli import main as fss_run
    from fss.serve import Client, ServeError

    ckpt, bundle, repo = tmp_path / "small.pt", tmp_path / "bundle", tmp_path / "repo"
    fss.save_checkpoint(small_method_model(method), ckpt)
    (repo / "mine").mkdir(parents=True)
    assert fss_export(["--ckpt", str(ckpt), "--out", str(bundle), "--triton-repo", str(repo)]) == 2
    assert not bundle.exists()  # refused before the export
    (repo / "mine").rmdir()
    assert fss_export(["--ckpt", str(ckpt), "--out", str(bundle), "--triton-repo", str(repo)]) == 0
    encoder = (repo / "fss_encoder" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in encoder and "dims: [ 3, 65, 65 ]" in encoder
    assert "dynamic_batching" in encoder
    segment = (repo / "fss_segment" / "config.pbtxt").read_text()
    assert 'backend: "python"' in segment and 'string_value: "fss_encoder"' in segment
    assert (repo / "fss_encoder" / "1" / "encoder.onnx").is_file()
    # As written, PyTriton's server cannot load fss_encoder (no ONNX Runtime backend): the head models
    # fall back to ONNX Runtime in-process. A copy gets the stand-in, so the head reaches it through BLS.
    bls_repo = tmp_path / "repo-bls"
    shutil.copytree(repo, bls_repo)
    (bls_repo / "fss_encoder" / "1" / "model.py").write_text(ONNX_STAND_IN)
    encoder = encoder.replace('platform: "onnxruntime_onnx"', 'backend: "python"')
    (bls_repo / "fss_encoder" / "config.pbtxt").write_text(
        encoder.replace('default_model_filename: "encoder.onnx"', "")
    )
    servers = [Server(tmp_path / f"{r.name}.log", "--repository", str(r)) for r in (repo, bls_repo)]
    try:
        assert (
            fss_run(
                ["--support", str(EXAMPLES / "support"), "--query", str(EXAMPLES / "query")]
                + ["--bundle", str(bundle), "--out", str(tmp_path / "out"), "--no-overlays"]
            )
            == 0
        )
        for server in servers:
            server.wait_ready()
            client = Client(server.url)
            sid = client.register_support(EXAMPLES / "support")
            for query in queries():
                expected = np.asarray(Image.open(tmp_path / "out" / f"{query.stem}.png"))
                np.testing.assert_array_equal(client.segment(sid, query.read_bytes()), expected)
            batch = client.segment_batch(sid, [q.read_bytes() for q in queries()])  # rows of two sizes
            for labels, query in zip(batch, queries(), strict=True):
                expected = np.asarray(Image.open(tmp_path / "out" / f"{query.stem}.png"))
                np.testing.assert_array_equal(labels, expected)
            with pytest.raises(ServeError, match="not a readable image"):
                client.segment(sid, b"junk")
            # No PyTriton proxy here: an empty support set reaches fss's handlers, one line back.
            with pytest.raises(ServeError, match="^a support set needs at least one shot"):
                client.support_op(protocol.OP_REGISTER, images=[], masks=[], classes=[])
    finally:
        codes = [server.stop() for server in servers]
    assert codes == [0, 0], [server.log.read_text()[-2000:] for server in servers]
    assert "running the bundle's ONNX graph in ONNX Runtime" in servers[0].log.read_text()
    assert "running the bundle's ONNX graph" not in servers[1].log.read_text()
