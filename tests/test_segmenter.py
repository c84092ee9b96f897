"""The Segmenter: cached supports equal the full model, incremental shots, streams, threads, memory."""

import threading

import numpy as np
import pytest
import torch
from helpers import random_model
from PIL import Image

import fss
from fss.constants import PAPER_NORMALISATION
from fss.errors import ShotIndexError, SupportError
from fss.io.tensors import image_tensor, mask_tensor
from fss.runtime.segmenter import Segmenter

SIZE = 49


def random_images(rng, n, size=(SIZE, SIZE)):
    return [(rng.random((size[1], size[0], 3)) * 255).astype(np.uint8) for _ in range(n)]


def random_masks(rng, n, size=(SIZE, SIZE)):
    masks = []
    for _ in range(n):
        m = (rng.random((size[1], size[0])) > 0.55).astype(np.uint8)
        m[rng.random(m.shape) > 0.95] = 255  # ignored pixels: in neither fg nor bg
        m[0, 0] = 1
        masks.append(m)
    return masks


def model_labels(model, supp_images, supp_masks, query):
    """The full PANet forward on one episode (ragged shots via shot_mask), argmax at SIZE."""
    model.impl = "torch"
    N, K = len(supp_images), max(map(len, supp_images))
    imgs = torch.zeros(1, N, K, 3, SIZE, SIZE)
    fg = torch.zeros(1, N, K, SIZE, SIZE)
    bg = torch.zeros(1, N, K, SIZE, SIZE)
    shot_mask = torch.zeros(1, N, K, dtype=torch.bool)
    for n, (images, masks) in enumerate(zip(supp_images, supp_masks, strict=True)):
        for k, (image, mask) in enumerate(zip(images, masks, strict=True)):
            imgs[0, n, k] = image_tensor(Image.fromarray(image), SIZE, PAPER_NORMALISATION)
            m = mask_tensor(mask, SIZE)
            fg[0, n, k], bg[0, n, k], shot_mask[0, n, k] = (m == 1).float(), (m == 0).float(), True
    qry = image_tensor(Image.fromarray(query), SIZE, PAPER_NORMALISATION)[None, None]
    with torch.no_grad():
        return model(imgs, fg, bg, qry, shot_mask=shot_mask).argmax(2)[0, 0].numpy()


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_cached_supports_equal_full_model(impl):
    rng = np.random.default_rng()
    model = random_model(input_size=SIZE)
    supp = [random_images(rng, 2), random_images(rng, 1), random_images(rng, 3)]
    masks = [random_masks(rng, 2), random_masks(rng, 1), random_masks(rng, 3)]
    queries = random_images(rng, 3)
    seg = Segmenter(model, size=SIZE, batch=2, impl=impl)
    seg.set_support(supp, masks, ["a", "b", "c"])
    for query, labels in zip(queries, seg.segment(queries), strict=True):
        assert labels.dtype == np.uint8 and labels.shape == (SIZE, SIZE)
        assert (labels == model_labels(model, supp, masks, query)).mean() > 0.999


def test_incremental_shots_equal_a_fresh_registration():
    rng = np.random.default_rng()
    model = random_model(input_size=SIZE)
    supp, masks = [random_images(rng, 2), random_images(rng, 2)], [random_masks(rng, 2), random_masks(rng, 2)]
    seg = Segmenter(model, size=SIZE, impl="torch")
    seg.set_support([supp[0][:1], supp[1]], [masks[0][:1], masks[1]], ["a", "b"])
    seg.add_shot("a", supp[0][1], masks[0][1])
    fresh = Segmenter(model, size=SIZE, impl="torch")
    fresh.set_support(supp, masks, ["a", "b"])
    torch.testing.assert_close(seg.support(None).protos, fresh.support(None).protos, rtol=1e-6, atol=1e-6)
    seg.remove_shot("b", 0)
    fresh.set_support([supp[0], supp[1][1:]], [masks[0], masks[1][1:]], ["a", "b"])
    torch.testing.assert_close(seg.support(None).protos, fresh.support(None).protos, rtol=1e-6, atol=1e-6)
    seg.add_shot("c", supp[1][0], masks[1][0])
    assert seg.classes() == ["a", "b", "c"]
    with pytest.raises(ValueError, match="only shot"):
        seg.remove_shot("c", 0)
    with pytest.raises(KeyError):
        seg.remove_shot("zzz", 0)


def test_named_support_sets_and_misuse():
    rng = np.random.default_rng()
    seg = Segmenter(random_model(input_size=SIZE), size=SIZE)
    with pytest.raises(RuntimeError, match="set_support"):
        seg.segment(random_images(rng, 1))
    seg.add_support("x", [random_images(rng, 1)], [random_masks(rng, 1)], ["thing"])
    seg.add_support(
        "y", [random_images(rng, 1), random_images(rng, 1)], [random_masks(rng, 1)] * 2, ["p", "q"]
    )
    assert seg.segment(random_images(rng, 1), support="y")[0].max() <= 2
    seg.remove_support("x")
    with pytest.raises(KeyError, match="no support set named 'x'"):
        seg.segment(random_images(rng, 1), support="x")
    with pytest.raises(ValueError, match="no foreground"):
        seg.set_support([random_images(rng, 1)], [[np.zeros((SIZE, SIZE), np.uint8)]])
    with pytest.raises(ValueError, match="differs from image size"):
        seg.set_support([random_images(rng, 1)], [random_masks(rng, 1, size=(10, 10))])


def test_a_store_handed_in_is_shared_and_edits_make_new_sets():
    rng = np.random.default_rng()
    model = random_model(input_size=SIZE)
    store = {}
    seg, other = (Segmenter(model, size=SIZE, impl="torch", store=store) for _ in range(2))
    imgs, masks = random_images(rng, 2), random_masks(rng, 2)
    base = seg.encode_support([imgs[:1]], [masks[:1]], ["a"])
    grown = seg.with_shot(base, "a", imgs[1], masks[1])
    assert not store and [len(f) for f in base.fg] == [1] and [len(f) for f in grown.fg] == [2]
    assert torch.equal(seg.without_shot(grown, "a", 1).protos, base.protos)
    seg.add_support("s", [imgs], [masks], ["a"])
    query = random_images(rng, 1)
    assert np.array_equal(other.segment(query, support="s")[0], seg.segment(query, support="s")[0])
    with pytest.raises(ShotIndexError, match="has 2 shots, no shot 5") as error:
        other.remove_shot("a", 5, support="s")
    assert isinstance(error.value, IndexError)  # typed, and still the builtin callers catch
    with pytest.raises(SupportError, match="distinct class names"):
        seg.encode_support([imgs[:1], imgs[1:]], [masks[:1], masks[1:]], ["a", "a"])
    other.remove_support("s")
    assert not seg.has_support("s") and not other.has_support("s")


def test_stream_keeps_order_and_reports_bad_items():
    rng = np.random.default_rng()
    seg = Segmenter(random_model(input_size=SIZE), size=SIZE, batch=3, workers=2)
    seg.set_support([random_images(rng, 1)], [random_masks(rng, 1)], ["thing"])
    queries = random_images(rng, 7, size=(31, 23))
    items = [*queries[:4], "/nonexistent/query.jpg", *queries[4:]]
    out = list(seg.segment_stream(items))
    assert [o.query is item for o, item in zip(out, items, strict=True)] == [True] * len(items)
    assert out[4].image is None and "not found" in str(out[4].error)
    expected = seg.segment(queries)
    got = [o.labels for o in out if o.error is None]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    labels, probs = seg.segment(queries[:2], return_prob=True)
    assert probs[0].shape == labels[0].shape and (probs[0] >= 0.5 - 1e-6).all() and (probs[0] <= 1).all()


def test_concurrent_calls_from_threads_match_sequential():
    rng = np.random.default_rng()
    seg = Segmenter(random_model(input_size=SIZE), size=SIZE, batch=2)
    seg.set_support([random_images(rng, 2)], [random_masks(rng, 2)], ["thing"])
    queries = [random_images(rng, 3) for _ in range(4)]
    expected = [seg.segment(q) for q in queries]
    results = [None] * len(queries)

    def work(i):
        results[i] = seg.segment(queries[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(
    not hasattr(fss, "__version__") or not __import__("os").path.exists("/proc/self/statm"),
    reason="needs /proc",
)
def test_memory_stays_flat_over_10000_queries():
    rng = np.random.default_rng()
    seg = Segmenter(random_model(width=0.0625, input_size=17), size=17, batch=50)
    seg.set_support([random_images(rng, 1, size=(17, 17))], [random_masks(rng, 1, size=(17, 17))], ["thing"])
    queries = random_images(rng, 50, size=(16, 16))
    for _ in range(20):  # warm-up: allocator pools and caches reach their steady state
        seg.segment(queries)
    before = rss_bytes()
    for _ in range(180):
        for result in seg.segment_stream(queries):
            assert result.labels.shape == (16, 16)
    growth = rss_bytes() - before
    assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 9,000 streamed queries"


def test_a_support_folder_registers_as_fss_run_reads_it(tmp_path):
    """from_folder / set_support(folder): the folder's classes in name order, the same state as the lists
    it holds; a folder that is not one is a one-line error."""
    from helpers import make_queries, make_support

    support = make_support(tmp_path / "support", classes=("dog", "cat"), shots=(1, 2))
    queries = sorted(make_queries(tmp_path / "query", n=2).glob("*.jpg"))
    model = random_model(input_size=SIZE)
    seg = Segmenter.from_folder(support, model=model)
    assert seg.classes() == ["cat", "dog"]  # name order, whatever the folders' creation order
    by_lists = Segmenter(model)
    cats, dogs = sorted((support / "cat").glob("*.jpg")), sorted((support / "dog").glob("*.jpg"))
    masks = [[p.with_suffix(".png") for p in cats], [p.with_suffix(".png") for p in dogs]]
    by_lists.set_support([cats, dogs], masks, ["cat", "dog"])
    for ours, theirs in zip(seg.segment(queries), by_lists.segment(queries), strict=True):
        assert np.array_equal(ours, theirs)
    seg.add_support("again", str(support))
    assert seg.classes("again") == ["cat", "dog"]
    with pytest.raises(fss.FssError, match="nosuch"):
        seg.set_support(tmp_path / "nosuch")


def test_one_image_gives_one_result():
    rng = np.random.default_rng(3)
    seg = Segmenter(random_model(input_size=SIZE))
    seg.set_support([random_images(rng, 1)], [random_masks(rng, 1)], ["cat"])
    query = random_images(rng, 1, size=(37, 29))[0]
    labels = seg.segment(query)
    assert labels.shape == (29, 37) and np.array_equal(labels, seg.segment([query])[0])
    labels_again, prob = seg.segment(Image.fromarray(query), return_prob=True)
    assert np.array_equal(labels_again, labels) and prob.shape == (29, 37)


def test_dir_of_the_package_shows_its_api():
    import fss.serve

    assert {"Segmenter", "load_model", "FewShotModel", "register_method", "__version__"} <= set(dir(fss))
    assert not {"os", "lazy_attributes", "import_module"} & set(dir(fss))
    assert {"Client", "ServeConfig"} <= set(dir(fss.serve))
