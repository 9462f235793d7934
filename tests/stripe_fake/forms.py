"""Stripe's request encoding: `application/x-www-form-urlencoded` with bracketed keys.

`items[0][price]=p&metadata[a]=b&expand[]=x` -> {"items": [{"price": "p"}], "metadata": {"a": "b"},
"expand": ["x"]}. Values stay strings, as on the wire; each endpoint coerces what it reads.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

_PART = re.compile(r"\[([^\]]*)\]")


class FormError(ValueError):
    pass


def _path(key: str) -> list[str]:
    head, bracket, rest = key.partition("[")
    if not head:
        raise FormError(f"Invalid parameter name: {key}")
    if not bracket:
        return [head]
    parts = _PART.findall("[" + rest)
    if "".join(f"[{p}]" for p in parts) != "[" + rest:
        raise FormError(f"Invalid parameter name: {key}")
    return [head, *parts]


def _listify(node: Any) -> Any:
    if isinstance(node, dict):
        converted = {k: _listify(v) for k, v in node.items()}
        if converted and all(k.isdigit() for k in converted):
            return [converted[k] for k in sorted(converted, key=int)]
        return converted
    if isinstance(node, list):
        return [_listify(v) for v in node]
    return node


def decode(body: str) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for key, value in parse_qsl(body, keep_blank_values=True, strict_parsing=False):
        path = _path(key)
        node: Any = root
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if part == "":  # `key[]`: append
                if not isinstance(node, list):
                    raise FormError(f"Invalid array parameter: {key}")
                if last:
                    node.append(value)
                else:
                    node.append({})
                    node = node[-1]
                continue
            if not isinstance(node, dict):
                raise FormError(f"Invalid parameter: {key}")
            if last:
                node[part] = value
            else:
                following = path[i + 1]
                default: Any = [] if following == "" else {}
                node = node.setdefault(part, default)
    return _listify(root)
