"""How deep a JSON body nests, found from its bytes before any decoder sees it.

msgspec (and any recursive code after it: schema walks, encoders, the estimator) fails with a
RecursionError somewhere near a thousand levels; no coding tool's request nests deeper than a
dozen or so (the deepest are tool schemas). `too_deep` rejects anything past a limit first.

It runs on every request, so everything happens in whole-buffer passes made in C:
1. a body with no more opening brackets than the limit cannot nest deeper than it (most
   small requests stop here);
2. escaped backslashes and quotes are dropped, so every remaining quote opens or closes a
   string; everything but brackets and quotes is dropped (`{}` become `[]`: only depth
   matters now), and splitting on quotes keeps what lies outside strings;
3. one possessive regular expression, built for the limit, matches bracket groups no deeper
   than it (plus stray closing brackets): it reaches the end of every valid JSON body within
   the limit, at 10-20 ns a bracket, and stops at the first group that goes deeper or never
   closes. From there the groups are followed inward, one level per step, each step one match
   of the pattern for the depth left: past the limit it is too deep; reaching the end, it was
   only unclosed (a truncated body, which the decoder refuses as such). At most limit + 1 steps.
Bytes inside a multi-byte UTF-8 sequence are all >= 0x80, so they never look like a bracket,
a quote or a backslash; invalid UTF-8 needs no special case.
"""
from __future__ import annotations

import functools
import re

DEFAULT_LIMIT = 64

_ALL_BUT_BRACKETS_AND_QUOTES = bytes(b for b in range(256) if b not in b'[]{}"')
_ONE_KIND = bytes.maketrans(b"{}", b"[]")


@functools.lru_cache(maxsize=None)
def _groups(depth: int) -> str:
    """Any number of whole bracket groups nesting at most `depth` deep (possessive: no backtracking)."""
    return "" if depth <= 0 else r"(?:\[" + _groups(depth - 1) + r"\])*+"


@functools.lru_cache(maxsize=None)
def _within(depth: int) -> re.Pattern[bytes]:
    return re.compile(_groups(depth).encode())


@functools.lru_cache(maxsize=None)
def _top(depth: int) -> re.Pattern[bytes]:
    # at the top, a closing bracket with nothing to close is passed over (the body is not JSON;
    # the decoder says so), and depth counts again from there
    group = r"|\[" + _groups(depth - 1) + r"\]" if depth > 0 else ""
    return re.compile((r"(?:\]" + group + r")*+").encode())


def prepare(limit: int = DEFAULT_LIMIT) -> None:
    """Compile the patterns `too_deep(..., limit)` may need (~70 ms for 64 levels, ~300 ms for
    128), so no request waits for them; call once at start-up."""
    _top(limit)
    for depth in range(limit):
        _within(depth)


def too_deep(body: bytes, limit: int = DEFAULT_LIMIT) -> bool:
    """True when the JSON in `body` nests arrays and objects deeper than `limit`.

    Malformed JSON is judged on its brackets outside strings: an unclosed group counts as deep
    as it goes, a stray closing bracket starts the count afresh. The decoder refuses it after.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    if b'\\"' in body:
        # a quote is escaped when an odd run of backslashes precedes it; runs pair up from
        # their left, so dropping `\\` and then `\"` leaves only the quotes delimiting strings
        # (with no `\\"` anywhere, every `\"` is a lone escape and one replace is enough)
        if b'\\\\"' in body:
            body = body.replace(b"\\\\", b"")
        body = body.replace(b'\\"', b"")
    brackets = body.translate(_ONE_KIND, _ALL_BUT_BRACKETS_AND_QUOTES)
    if b'"' in brackets:
        brackets = b"".join(brackets.split(b'"')[::2])
    if brackets.count(b"[") <= limit:
        return False
    end = len(brackets)
    at = _top(limit).match(brackets).end()
    level = 0
    while at < end:
        # brackets[at] opens a group deeper than the depth left here, or one that never closes
        # (a closing bracket cannot come next: it would have closed a group the pattern takes)
        level += 1
        if level > limit:
            return True
        at = _within(limit - level).match(brackets, at + 1).end()
    return False
