"""Parsing of the guest's serial-console markers.

A marker is a line containing ``VUB-MARK <name> key=value key=value ...``
(anything before ``VUB-MARK`` on the line, e.g. terminal escapes, is
ignored).  Values are kept as strings; use :func:`num` to convert.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

MARK_RE = re.compile(r"VUB-MARK (\S+)(.*)$")


@dataclass
class Marker:
    name: str
    values: Dict[str, str] = field(default_factory=dict)
    index: int = 0          # position in the list of all markers of the guest
    line: str = ""

    def __getitem__(self, key: str) -> str:
        return self.values[key]

    def get(self, key: str, default=None):
        return self.values.get(key, default)

    def num(self, key: str, default=None) -> Union[int, float, None]:
        return num(self.values.get(key), default)


def num(v: Optional[str], default=None) -> Union[int, float, None]:
    if v is None:
        return default
    for conv in (lambda x: int(x, 0), int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return default


def parse_line(line: str, index: int = 0) -> Optional[Marker]:
    m = MARK_RE.search(line.rstrip("\r\n"))
    if not m:
        return None
    vals: Dict[str, str] = {}
    for tok in m.group(2).split():
        k, sep, v = tok.partition("=")
        if sep:
            vals[k] = v
    return Marker(m.group(1), vals, index, line.rstrip("\r\n"))


class MarkerReader:
    """Incrementally reads a growing serial log file and collects markers."""

    def __init__(self, path):
        self.path = path
        self._pos = 0
        self._partial = b""
        self.markers: List[Marker] = []

    def poll(self) -> List[Marker]:
        """Read new complete lines; return the markers found in them."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return []
        if not data:
            return []
        self._pos += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        new = []
        for raw in lines:
            mk = parse_line(raw.decode("utf-8", "replace"), len(self.markers))
            if mk:
                self.markers.append(mk)
                new.append(mk)
        return new
