"""Offline, licence-clean text for the tiny language models: byte-level tokens, fixed split.

Default corpus: the English documentation text that ships with every CPython installation
(``pydoc_data.topics.topics``, the help pages behind ``help("for")`` etc., under the PSF licence
that covers CPython itself).  Its topics are joined in sorted-key order, so the corpus is the
same on every machine with the same Python version (466,195 bytes on Python 3.11.7; the exact
text changes between Python releases).  Nothing is downloaded at import or test time.

* Tokenisation is byte-level: vocabulary 256, ``token = byte``.  A file is read as raw bytes, so
  any file works, UTF-8 or not (:func:`decode` shows invalid UTF-8 as U+FFFD).
* The split is fixed: the first 90 % of the bytes train, the last 10 % validate; a text too short
  for both splits to be non-empty is refused.
* Training batches are random windows drawn with a caller-owned ``torch.Generator`` (so a
  resumed run can restore the generator state); validation uses fixed, evenly spaced windows.
* Any regular file can replace the default corpus (``--text-file`` in ``umv2_ref.train``); a
  directory, a device such as ``/dev/null`` or an empty file is refused.
* Users with internet can fetch Tiny Shakespeare once with
  ``python -m umv2_ref.data --download-shakespeare data/tinyshakespeare.txt`` and then pass
  ``--text-file data/tinyshakespeare.txt``.  The tests never call it.
"""
from __future__ import annotations

import argparse
import hashlib
import math
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

VOCAB_SIZE = 256  # byte-level
VAL_FRACTION = 0.1
SPLITS = ("train", "val")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_BYTES = 1_115_394


def default_corpus() -> str:
    """CPython's bundled documentation topics, joined in sorted-key order with blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics)) + "\n"


def encode(text: str | bytes) -> Tensor:
    """UTF-8 bytes of ``text`` (or the raw ``bytes``) as a ``uint8`` tensor ``[n_bytes]`` (token ids 0..255)."""
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if not raw:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def decode(tokens: Tensor) -> str:
    """Inverse of :func:`encode`; invalid UTF-8 (a window cut mid-character) becomes U+FFFD."""
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


class TextData:
    """A byte-tokenised corpus with a fixed train/validation split (last ``val_fraction`` validates).

    ``text`` is a string (encoded as UTF-8) or raw bytes.  Both splits must be non-empty:
    ``int(n_bytes * val_fraction) >= 1`` and the rest trains; otherwise ``ValueError``.
    """

    def __init__(self, text: str | bytes, val_fraction: float = VAL_FRACTION, name: str = "text"):
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        self.name = name
        self.tokens = encode(text)  # [n] uint8
        n = len(self.tokens)
        n_val = int(n * val_fraction)
        if n_val < 1:
            need = math.ceil(1 / val_fraction)
            raise ValueError(f"{name} has {n} bytes, too few to split with val_fraction={val_fraction}: "
                             f"the val split would be empty (need at least {need} bytes)")
        self.splits = {"train": self.tokens[:n - n_val], "val": self.tokens[n - n_val:]}
        self.sha256 = hashlib.sha256(text.encode("utf-8") if isinstance(text, str) else bytes(text)).hexdigest()

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> "TextData":
        """The file's raw bytes (byte-level tokens: UTF-8 or not, every regular file works)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"text_file {str(path)!r} does not exist")
        if not path.is_file():
            raise ValueError(f"text_file {str(path)!r} is not a regular file (a directory or a device)")
        return cls(path.read_bytes(), name=path.name, **kwargs)

    def check_seq_len(self, seq_len: int) -> None:
        """Both splits hold more than ``seq_len + 1`` bytes (one window and its shifted target)."""
        for split in SPLITS:
            self._split(split, seq_len)

    def _split(self, split: str, seq_len: int) -> Tensor:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        data = self.splits[split]
        if len(data) <= seq_len + 1:
            raise ValueError(f"seq_len={seq_len} is too long for the {split} split of {self.name} ({len(data)} bytes)")
        return data

    def get_batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random windows: ``inputs [B, T]`` and next-byte ``targets [B, T]`` (int64)."""
        data = self._split(split, seq_len)
        starts = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=generator)  # [B]
        window = starts[:, None] + torch.arange(seq_len + 1)  # [B, T+1]
        chunk = data[window].long()  # [B, T+1]
        return chunk[:, :-1], chunk[:, 1:]

    def eval_batches(self, split: str, n_batches: int, batch_size: int, seq_len: int) -> list[tuple[Tensor, Tensor]]:
        """``n_batches`` fixed batches of evenly spaced windows (no randomness; same every call)."""
        data = self._split(split, seq_len)
        n = n_batches * batch_size
        starts = torch.linspace(0, len(data) - seq_len - 1, n).long()  # [n]
        chunk = data[starts[:, None] + torch.arange(seq_len + 1)].long()  # [n, T+1]
        x, y = chunk[:, :-1], chunk[:, 1:]
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


def load(text_file: str | None = None) -> TextData:
    """The default corpus (``text_file=None``) or a file's bytes, cached per path and file version."""
    if text_file is None:
        return _load(None, None)
    path = Path(text_file)
    version = (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else None
    return _load(text_file, version)


@lru_cache(maxsize=4)
def _load(text_file: str | None, version: tuple | None) -> TextData:
    if text_file is None:
        return TextData(default_corpus(), name="pydoc_topics")
    return TextData.from_file(text_file)


def get_batch(split: str, batch_size: int, seq_len: int, generator: torch.Generator,
              text_file: str | None = None) -> tuple[Tensor, Tensor]:
    """A training batch from the default corpus (or ``text_file``); see :meth:`TextData.get_batch`."""
    return load(text_file).get_batch(split, batch_size, seq_len, generator)


def download_tiny_shakespeare(dest: str | Path, url: str = SHAKESPEARE_URL) -> Path:
    """Optional, needs internet: fetch Tiny Shakespeare (public-domain text) to ``dest``.

    Never called by the tests or at import.  Prints the file's SHA-256 so it can be recorded.
    """
    import urllib.request

    dest = Path(dest)
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (fixed https URL)
        payload = response.read()
    if len(payload) != SHAKESPEARE_BYTES:
        raise RuntimeError(f"expected {SHAKESPEARE_BYTES} bytes from {url}, got {len(payload)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(payload)
    print(f"wrote {dest} ({len(payload)} bytes, sha256 {hashlib.sha256(payload).hexdigest()})")
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--download-shakespeare", metavar="PATH", help="fetch Tiny Shakespeare (needs internet)")
    parser.add_argument("--text-file", help="describe this text file instead of the default corpus")
    args = parser.parse_args(argv)
    if args.download_shakespeare:
        download_tiny_shakespeare(args.download_shakespeare)
        return
    data = load(args.text_file)
    print(f"{data.name}: {len(data.tokens)} bytes (train {len(data.splits['train'])}, "
          f"val {len(data.splits['val'])}), sha256 {data.sha256}")


if __name__ == "__main__":
    main()
