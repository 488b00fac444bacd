"""Where a key lives in a TOML file: maps key paths to 1-based line numbers for error messages.

tomllib gives no positions for values, so policy errors would otherwise say only *what* is wrong.
This scans the text for table headers (`[a.b]`, `[[a]]`) and `key =` lines; it understands the
subset of TOML that policy files use, and falls back to the nearest enclosing key it found.
"""

from __future__ import annotations

import json
import re

Path = tuple[str | int, ...]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_PART = r"""(?:"(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)"""
_KEY = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=")
_PARTS = re.compile(r"""\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*(?:\.|$)""")


def _split_dotted(text: str) -> list[str]:
    """`nodes."pi.lan"` -> ["nodes", "pi.lan"]: dots inside quotes belong to the key."""
    return [json.loads(f'"{basic}"') if basic else literal or bare
            for basic, literal, bare in _PARTS.findall(text)]


def index_lines(text: str) -> dict[Path, int]:
    """Map every table header and key path found in `text` to its line number."""
    lines: dict[Path, int] = {}
    counters: dict[tuple[str, ...], int] = {}
    table: Path = ()
    for number, line in enumerate(text.splitlines(), start=1):
        if header := _HEADER.match(line):
            table = names = tuple(_split_dotted(header.group(2)))
            if header.group(1) == "[[":
                counters[names] = counters.get(names, -1) + 1
                table = (*names, counters[names])
            lines.setdefault(table, number)
        elif key := _KEY.match(line):
            lines.setdefault((*table, *_split_dotted(key.group(1))), number)
    return lines


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """The line of `path`, or of its nearest ancestor that has one."""
    return next((lines[path[:end]] for end in range(len(path), 0, -1) if path[:end] in lines), None)


def parse_msgspec_path(message: str) -> Path:
    """`... - at `$.routes[1].match.model`` -> ("routes", 1, "match", "model")."""
    if not (found := re.search(r"at `\$([^`]*)`", message)):
        return ()
    return tuple(int(index) if index else name
                 for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", found.group(1)))
