"""How deep a JSON body nests, found from its bytes before any decoder sees it.

msgspec (and any recursive code after it: schema walks, encoders, the estimator) fails with a
RecursionError somewhere near a thousand levels; no coding tool's request nests deeper than a
dozen or so (the deepest are tool schemas). `too_deep` rejects anything past a limit first.

It runs on every request, so it works in whole-buffer passes made in C (count, replace,
translate, split) and reaches a per-byte Python loop only for bodies that could be too deep:
- a body with no more opening brackets than the limit cannot nest deeper than it;
- escaped backslashes and quotes are dropped, so every remaining quote opens or closes a
  string, and splitting on quotes leaves what lies outside strings at the even positions;
- the structural brackets left are summed in blocks (+1 / -1 as signed bytes), stopping at
  the first block that goes past the limit.
Bytes inside a multi-byte UTF-8 sequence are all >= 0x80, so they never look like a bracket,
a quote or a backslash; invalid UTF-8 needs no special case.
"""
from __future__ import annotations

from itertools import accumulate

DEFAULT_LIMIT = 64

_BRACKETS_AND_QUOTES = b'[]{}"'
_ALL_BUT_BRACKETS_AND_QUOTES = bytes(b for b in range(256) if b not in _BRACKETS_AND_QUOTES)
# as signed bytes: an opening bracket is +1, a closing one -1
_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_BLOCK = 1 << 16


def _opens(data: bytes) -> int:
    return data.count(b"[") + data.count(b"{")


def too_deep(body: bytes, limit: int = DEFAULT_LIMIT) -> bool:
    """True when the JSON in `body` nests arrays and objects deeper than `limit`.

    Malformed JSON (unbalanced brackets, an unterminated string) is judged on what it holds;
    the decoder rejects it for what it is afterwards.
    """
    if _opens(body) <= limit:
        return False
    if b"\\" in body:
        # a run of backslashes pairs up from its left, so dropping `\\` first and then `\"`
        # leaves exactly the quotes that delimit strings
        if b"\\\\" in body:
            body = body.replace(b"\\\\", b"")
        body = body.replace(b'\\"', b"")
    structure = body.translate(None, _ALL_BUT_BRACKETS_AND_QUOTES)
    if b'"' in structure:
        structure = b"".join(structure.split(b'"')[::2])
    if _opens(structure) <= limit:
        return False
    signs = memoryview(structure.translate(_SIGNS)).cast("b")
    depth = 0
    for start in range(0, len(signs), _BLOCK):
        running = list(accumulate(signs[start:start + _BLOCK], initial=depth))
        if max(running) > limit:
            return True
        depth = running[-1]
    return False
