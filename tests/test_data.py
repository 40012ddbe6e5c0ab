"""umv2_ref.data: the bundled corpus, byte tokens, the fixed split and deterministic batches."""
import urllib.request

import pytest
import torch

from umv2_ref import data


@pytest.fixture
def ab_text():
    """900 'a' then 100 'b': the last 10 % (validation) is exactly the b's."""
    return data.TextData("a" * 900 + "b" * 100)


def test_default_corpus_is_the_sorted_pydoc_topics():
    from pydoc_data.topics import topics

    text = data.default_corpus()
    assert len(text) > 100_000
    first, last = sorted(topics)[0], sorted(topics)[-1]
    assert text.startswith(topics[first].strip()[:200])
    assert text.rstrip().endswith(topics[last].strip()[-200:])
    assert data.default_corpus() == text


def test_encode_decode_round_trip_and_vocab():
    text = "héllo, wörld\n"
    tokens = data.encode(text)
    assert tokens.dtype == torch.uint8 and len(tokens) == len(text.encode())
    assert data.decode(tokens) == text


def test_split_is_fixed_last_ten_percent(ab_text):
    assert len(ab_text.splits["train"]) == 900 and len(ab_text.splits["val"]) == 100
    assert set(ab_text.splits["val"].tolist()) == {ord("b")}
    corpus = data.load()
    assert torch.equal(torch.cat([corpus.splits["train"], corpus.splits["val"]]), corpus.tokens)


def test_batches_come_from_their_split(ab_text):
    g = torch.Generator().manual_seed(0)
    x, y = ab_text.get_batch("train", 8, 16, g)
    assert set(x.unique().tolist()) == {ord("a")}
    x, y = ab_text.get_batch("val", 8, 16, g)
    assert set(x.unique().tolist()) == {ord("b")}


def test_get_batch_shapes_shift_and_determinism():
    x, y = data.get_batch("train", 4, 32, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next bytes
    assert 0 <= int(x.min()) and int(x.max()) < data.VOCAB_SIZE
    x2, _ = data.get_batch("train", 4, 32, torch.Generator().manual_seed(3))
    x3, _ = data.get_batch("train", 4, 32, torch.Generator().manual_seed(4))
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def test_eval_batches_are_fixed_and_cover_the_split():
    corpus = data.load()
    a = corpus.eval_batches("val", 2, 4, 16)
    b = corpus.eval_batches("val", 2, 4, 16)
    assert len(a) == 2 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    val = corpus.splits["val"]
    assert torch.equal(a[0][0][0], val[:16].long())  # first window starts at the split's start


def test_text_file_and_errors(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("The quick brown fox. " * 50)
    corpus = data.TextData.from_file(path)
    assert corpus.name == "book.txt" and data.decode(corpus.tokens[:9]) == "The quick"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.TextData.from_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="split"):
        corpus.get_batch("test", 2, 8, torch.Generator())
    with pytest.raises(ValueError, match="seq_len"):
        corpus.get_batch("val", 2, 500, torch.Generator())
    with pytest.raises(ValueError, match="val_fraction"):
        data.TextData("abc", val_fraction=1.5)


def test_loading_and_batching_never_touch_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    data._load.cache_clear()
    data.get_batch("val", 2, 8, torch.Generator().manual_seed(0))


def test_a_split_that_would_be_empty_is_refused_not_swapped():
    text = "abcdefghijklmnopqrstuvwxyz" * 20  # 520 bytes: int(520 * 0.001) == 0 val bytes
    with pytest.raises(ValueError, match=r"val split would be empty \(need at least 1000 bytes\)"):
        data.TextData(text, val_fraction=0.001)
    with pytest.raises(ValueError, match="0 bytes"):
        data.TextData("")
    tiny = data.TextData("abcdefghij")  # 10 bytes: 1 validates, 9 train
    assert len(tiny.splits["train"]) == 9 and len(tiny.splits["val"]) == 1
    for fraction in (0.001, 0.1, 0.5, 0.9):
        corpus = data.TextData("x" * 4000, val_fraction=fraction)
        n_val = len(corpus.splits["val"])
        assert n_val == int(4000 * fraction) and len(corpus.splits["train"]) == 4000 - n_val


def test_files_are_read_as_bytes_utf8_or_not(tmp_path):
    raw = bytes(range(256)) * 4 + b"\xff\xfe\x80 not UTF-8"
    path = tmp_path / "binary.dat"
    path.write_bytes(raw)
    corpus = data.TextData.from_file(path)
    assert corpus.tokens.tolist() == list(raw)
    import hashlib

    assert corpus.sha256 == hashlib.sha256(raw).hexdigest()
    x, y = corpus.get_batch("train", 2, 8, torch.Generator().manual_seed(0))
    assert x.shape == (2, 8)


def test_directories_devices_and_empty_files_are_refused_clearly(tmp_path):
    import os

    for path in (tmp_path, os.devnull):
        with pytest.raises(ValueError, match="not a regular file"):
            data.TextData.from_file(path)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt has 0 bytes"):
        data.TextData.from_file(tmp_path / "empty.txt")


def test_load_sees_a_changed_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("first version " * 20)
    first = data.load(str(path))
    path.write_text("second version, longer " * 20)
    assert data.load(str(path)).sha256 != first.sha256
