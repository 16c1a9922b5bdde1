"""Thrift compact protocol, generically: enough to read a Parquet footer, edit it and
write it back with every field it had (apache/thrift doc/specs/thrift-compact-protocol.md).

A struct decodes to :class:`Struct`, a dict ``field id -> (type, value)``; lists to
:class:`List` ``(element type, values)``; maps to :class:`Map`. Integers of every width
are Python ints, binary/strings are bytes, booleans are bools. Unknown fields survive
a round trip unchanged.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

# Compact type codes.
STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)


class ThriftError(ValueError):
    pass


class List(NamedTuple):
    etype: int
    values: list


class Map(NamedTuple):
    ktype: int
    vtype: int
    items: list  # [(key, value)]


class Struct(dict):
    """``field id -> (compact type, value)``; booleans are stored with type TRUE."""

    def get_value(self, fid: int, default: Any = None) -> Any:
        item = self.get(fid)
        return default if item is None else item[1]

    def set(self, fid: int, ctype: int, value: Any) -> "Struct":
        self[fid] = (ctype, value)
        return self


def _zigzag(n: int) -> int:
    return (n << 1) if n >= 0 else ((-n) << 1) - 1


class Raw(bytes):
    """An already encoded struct: written as is (see :func:`dumps`)."""


class _Reader:
    """Reads from ``buf``; running past its end raises IndexError, which :func:`loads`
    reports as truncated data (no bounds test per byte)."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = memoryview(buf).cast("B")  # unsigned bytes (pyarrow buffers export "b")
        self.pos = 0

    def byte(self) -> int:
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        buf, pos = self.buf, self.pos
        b = buf[pos]
        pos += 1
        if b < 0x80:
            self.pos = pos
            return b
        result, shift = b & 0x7F, 7
        while True:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                self.pos = pos
                return result
            shift += 7
            if shift > 70:
                raise ThriftError("varint too long")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ThriftError("truncated Thrift data")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def value(self, ctype: int) -> Any:
        if ctype == I32 or ctype == I64 or ctype == I16:
            return self.zigzag()
        if ctype == STRUCT:
            return self.struct()
        if ctype == BINARY:
            return self.take(self.varint())
        if ctype == LIST or ctype == SET:
            head = self.byte()
            size, etype = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            return List(etype, [self.value(etype) for _ in range(size)])
        if ctype == TRUE or ctype == FALSE:  # inside a collection: one byte
            return self.byte() == TRUE
        if ctype == BYTE:
            b = self.byte()
            return b - 256 if b > 127 else b
        if ctype == DOUBLE:
            return struct.unpack("<d", self.take(8))[0]
        if ctype == MAP:
            size = self.varint()
            if size == 0:
                return Map(0, 0, [])
            kv = self.byte()
            kt, vt = kv >> 4, kv & 0x0F
            return Map(kt, vt, [(self.value(kt), self.value(vt)) for _ in range(size)])
        raise ThriftError(f"unknown Thrift compact type {ctype}")

    def struct(self) -> Struct:
        out = Struct()
        last = 0
        buf = self.buf
        while True:
            head = buf[self.pos]
            self.pos += 1
            if head == STOP:
                return out
            delta, ctype = head >> 4, head & 0x0F
            fid = last + delta if delta else self.zigzag()
            if ctype == TRUE or ctype == FALSE:
                out[fid] = (TRUE, ctype == TRUE)
            else:
                out[fid] = (ctype, self.value(ctype))
            last = fid


def loads(buf: bytes) -> tuple:
    """Decodes one struct from the start of ``buf``; returns (struct, bytes used)."""
    r = _Reader(buf)
    try:
        s = r.struct()
    except IndexError:
        raise ThriftError("truncated Thrift data") from None
    return s, r.pos


def varint(n: int) -> bytes:
    """An unsigned LEB128 varint (the compact protocol's, and Snappy's length header)."""
    out = bytearray()
    _write_varint(out, n)
    return bytes(out)


def varint_length(buf) -> int:
    """Bytes taken by the varint at the start of ``buf``."""
    r = _Reader(buf)
    try:
        r.varint()
    except IndexError:
        raise ThriftError("truncated varint") from None
    return r.pos


def _write_varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _write_value(out: bytearray, ctype: int, value: Any) -> None:
    if ctype in (TRUE, FALSE):
        out.append(TRUE if value else FALSE)
    elif ctype == BYTE:
        out.append(value & 0xFF)
    elif ctype in (I16, I32, I64):
        _write_varint(out, _zigzag(value))
    elif ctype == DOUBLE:
        out += struct.pack("<d", value)
    elif ctype == BINARY:
        if isinstance(value, str):
            value = value.encode()
        _write_varint(out, len(value))
        out += value
    elif ctype in (LIST, SET):
        etype, values = value
        if len(values) < 15:
            out.append((len(values) << 4) | etype)
        else:
            out.append(0xF0 | etype)
            _write_varint(out, len(values))
        for v in values:
            _write_value(out, etype, v)
    elif ctype == MAP:
        kt, vt, items = value
        _write_varint(out, len(items))
        if items:
            out.append((kt << 4) | vt)
            for k, v in items:
                _write_value(out, kt, k)
                _write_value(out, vt, v)
    elif ctype == STRUCT:
        if isinstance(value, Raw):
            out += value
        else:
            _write_struct(out, value)
    else:
        raise ThriftError(f"unknown Thrift compact type {ctype}")


def _write_struct(out: bytearray, s: Struct) -> None:
    last = 0
    for fid in sorted(s):
        ctype, value = s[fid]
        wire = (TRUE if value else FALSE) if ctype in (TRUE, FALSE) else ctype
        delta = fid - last
        if 0 < delta <= 15:
            out.append((delta << 4) | wire)
        else:
            out.append(wire)
            _write_varint(out, _zigzag(fid))
        if ctype not in (TRUE, FALSE):
            _write_value(out, ctype, value)
        last = fid
    out.append(STOP)


def dumps(s: Struct) -> bytes:
    """Encodes ``s``; a :class:`Raw` value inside it is copied as is."""
    out = bytearray()
    _write_struct(out, s)
    return bytes(out)
