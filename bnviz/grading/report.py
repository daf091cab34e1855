"""The worker's report, read on the trusted side: a format we parse ourselves, then a strict schema.

The sandbox is untrusted, so its report is too. The format (written by ``worker.encode``) is
``MAGIC`` + an 8-byte header length + a JSON header + the tensors' raw bytes. JSON cannot express
shared references, objects or code; the tensors are rebuilt here from (dtype, shape, offset,
length) with ``torch.frombuffer``, each from its own bytes. ``parse`` then checks the result
against ``LIMITS`` (depth, string / list / dict sizes, node count, tensor rank, dtypes, sizes) and
the report's own shape (which keys, which types), and raises ``ReportError`` naming the first thing
that does not fit. Nothing read from a report is passed to ``str()`` / ``repr()`` / a regex before
it has passed this check.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

MAGIC, MAGIC_PAIR = b"BNVZREP2", b"BNVZPAIR"
TENSOR_KEY = "\x00tensor"
PROTOCOL = 2
DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


class ReportError(ValueError):
    """The report does not fit the format or the schema; the message says where and why."""


@dataclasses.dataclass(frozen=True)
class Limits:
    depth: int = 12  # nesting of dicts / lists
    string: int = 1000  # characters in any string (the worker caps its messages at 120, names at 200)
    items: int = 4096  # elements of a list, keys of a dict
    nodes: int = 200_000  # values in the whole report
    rank: int = 8  # tensor dimensions
    tensors: int = 20_000


def _fail(where: list, why: str) -> None:
    path = ".".join(where) or "report"
    raise ReportError(f"{path[:120]}: {why}")


def split_pair(data: bytes) -> list[bytes]:
    """The worker's output: [normal pass] or [normal pass, strict pass]."""
    if not data.startswith(MAGIC_PAIR):
        raise ReportError("not a report of this grader's format")
    parts, pos = [], len(MAGIC_PAIR)
    while pos < len(data):
        if len(parts) == 2 or pos + 8 > len(data):
            raise ReportError("malformed report framing")
        (n,) = struct.unpack_from("<Q", data, pos)
        if pos + 8 + n > len(data):
            raise ReportError("report framing longer than the data")
        parts.append(data[pos + 8:pos + 8 + n])
        pos += 8 + n
    if not parts:
        raise ReportError("empty report")
    return parts


def _tensor_table(table: Any, payload_len: int, limits: Limits) -> list[tuple[str, list[int], int, int]]:
    if not isinstance(table, list) or len(table) > limits.tensors:
        _fail(["tensors"], "not a list of at most %d entries" % limits.tensors)
    import torch

    rows, offset = [], 0
    for i, row in enumerate(table):
        ok = (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str) and row[0] in DTYPES
              and isinstance(row[1], list) and len(row[1]) <= limits.rank
              and all(type(d) is int and 0 <= d < 1 << 31 for d in row[1])
              and type(row[2]) is int and type(row[3]) is int)
        if not ok:
            _fail(["tensors", str(i)], f"not [dtype ({', '.join(DTYPES)}), shape (at most {limits.rank} "
                                       "dimensions), offset, length]")
        numel = 1
        for d in row[1]:
            numel *= d
        if row[2] != offset or row[3] != numel * getattr(torch, row[0]).itemsize or offset + row[3] > payload_len:
            _fail(["tensors", str(i)], "offset or length does not match its shape, its place, or the data")
        rows.append((row[0], row[1], row[2], row[3]))
        offset += row[3]
    if offset != payload_len:
        _fail(["tensors"], "the tensors do not account for every byte of the data")
    return rows


def _split(part: bytes) -> tuple[dict, memoryview]:
    """A report's JSON header ({report, tensors}) and the tensor bytes after it."""
    if not part.startswith(MAGIC) or len(part) < len(MAGIC) + 8:
        raise ReportError("not a report of this grader's format")
    (n,) = struct.unpack_from("<Q", part, len(MAGIC))
    start = len(MAGIC) + 8
    if start + n > len(part):
        raise ReportError("header longer than the report")
    try:
        header = json.loads(part[start:start + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ReportError(f"header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(header, dict) or set(header) != {"report", "tensors"}:
        raise ReportError("header is not {report, tensors}")
    return header, memoryview(part)[start + n:]


@dataclasses.dataclass
class _Rebuild:
    """Walks a parsed header's report within ``limits``, putting each tensor (used once) in place."""

    table: list
    payload: memoryview
    limits: Limits
    nodes: int = 0

    def __post_init__(self):
        self.used = [False] * len(self.table)

    def tensor(self, index, where):
        import torch

        if type(index) is not int or not 0 <= index < len(self.table) or self.used[index]:
            _fail(where, "tensor reference out of range or used twice")
        self.used[index] = True
        dtype, shape, offset, length = self.table[index]
        dt = getattr(torch, dtype)
        if length == 0:
            return torch.empty(shape, dtype=dt)
        return torch.frombuffer(bytearray(self.payload[offset:offset + length]), dtype=dt).reshape(shape)

    def walk(self, value, where, depth):
        limits = self.limits
        self.nodes += 1
        if self.nodes > limits.nodes:
            _fail(where, f"more than {limits.nodes} values in the report")
        if depth > limits.depth:
            _fail(where, f"nested deeper than {limits.depth}")
        if isinstance(value, str):
            if len(value) > limits.string:
                _fail(where, f"a string of {len(value)} characters (at most {limits.string})")
            return value
        if value is None or type(value) in (bool, int, float):
            return value
        if isinstance(value, list):
            if len(value) > limits.items:
                _fail(where, f"a list of {len(value)} items (at most {limits.items})")
            return [self.walk(v, where + [str(i)], depth + 1) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return self.walk_dict(value, where, depth)
        _fail(where, "an unexpected type")  # json.loads makes nothing else

    def walk_dict(self, value: dict, where, depth):
        if len(value) > self.limits.items:
            _fail(where, f"a dict of {len(value)} keys (at most {self.limits.items})")
        if set(value) == {TENSOR_KEY}:
            return self.tensor(value[TENSOR_KEY], where)
        out = {}
        for k, v in value.items():
            if len(k) > 200:
                _fail(where, "a key longer than 200 characters")
            out[k] = self.walk(v, where + [_printable(k)], depth + 1)
        return out


def decode(part: bytes, limits: Limits = Limits()) -> dict:
    """One pass's report: parse (no shared references possible), rebuild tensors, check limits."""
    header, payload = _split(part)
    rebuild = _Rebuild(_tensor_table(header["tensors"], len(payload), limits), payload, limits)
    report = rebuild.walk(header["report"], [], 0)
    if not all(rebuild.used):
        _fail(["tensors"], "a tensor no value refers to")
    return report


def _printable(key: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in key[:40])


def _expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ReportError(f"{where}: {what}")


def check_shape(report: Any, kind: str) -> dict:
    """The report's own schema (after ``decode``): which keys, which types."""
    _expect(isinstance(report, dict), "report", "not a dict")
    _expect(report.get("protocol") == PROTOCOL, "protocol", f"not {PROTOCOL}")
    _expect(report.get("pass") == kind, "pass", f"not {kind!r}")
    errors = report.get("cell_errors")
    _expect(isinstance(errors, list), "cell_errors", "not a list")
    for i, e in enumerate(errors):
        _expect(isinstance(e, dict) and type(e.get("cell")) is int and isinstance(e.get("error"), str),
                f"cell_errors.{i}", "not {cell: int, error: str}")
    probes = report.get("probes")
    _expect(isinstance(probes, dict) and all(isinstance(v, dict) for v in probes.values()), "probes",
            "not a dict of dicts")
    if kind == "normal":
        tw = report.get("tripwire")
        _expect(isinstance(tw, dict) and type(tw.get("installed")) is bool and type(tw.get("intact")) is bool,
                "tripwire", "not {installed: bool, intact: bool, hits, ops}")
        hits, ops = tw.get("hits"), tw.get("ops")
        _expect(isinstance(hits, list) and all(isinstance(h, dict) and all(isinstance(h.get(k), str)
                for k in ("phase", "what", "via")) for h in hits), "tripwire.hits", "not a list of {phase, what, via}")
        _expect(isinstance(ops, dict) and all(type(v) is int for v in ops.values()), "tripwire.ops",
                "not a dict of counts")
    else:
        _expect(type(report.get("intact")) is bool, "intact", "not a bool")
    return report


def parse(data: bytes | None, limits: Limits = Limits()) -> tuple[dict, dict | None]:
    """(normal report, strict report or None); raises ReportError."""
    if not data:
        raise ReportError("no report")
    parts = split_pair(data)
    normal = check_shape(decode(parts[0], limits), "normal")
    strict = check_shape(decode(parts[1], limits), "strict") if len(parts) > 1 else None
    return normal, strict
