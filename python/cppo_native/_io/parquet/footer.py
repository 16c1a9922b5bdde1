"""Reading a Parquet footer and the facts both the append writer and the page decoder
need from it: top-level field subtrees, list levels, where a column chunk's bytes are."""

from __future__ import annotations

import os

from . import thrift as T
from .fields import ColumnMetaData as CMD
from .fields import SchemaElement as SE

# parquet.thrift FieldRepetitionType.
_REQUIRED, _OPTIONAL, _REPEATED = 0, 1, 2


class Unsupported(Exception):
    """The input cannot be appended to (the caller uses pyarrow's writer instead)."""


def read_footer(fh) -> T.Struct:
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    if size < 12:
        raise Unsupported("not a Parquet file")
    fh.seek(size - 8)
    tail = fh.read(8)
    if tail[4:] == b"PARE":
        raise Unsupported("encrypted Parquet footer")
    if tail[4:] != b"PAR1":
        raise Unsupported("not a Parquet file")
    n = int.from_bytes(tail[:4], "little")
    if n <= 0 or n > size - 12:
        raise Unsupported("bad footer length")
    fh.seek(size - 8 - n)
    meta, _ = T.loads(fh.read(n))
    return meta


def _subtrees(schema: list) -> list:
    """[(first element, end, [leaf numbers])] for each top-level field."""
    out = []
    leaf = 0

    def walk(i: int) -> tuple:
        nonlocal leaf
        kids = schema[i].get_value(SE.NUM_CHILDREN, 0) or 0
        if kids == 0:
            leaf += 1
            return i + 1
        j = i + 1
        for _ in range(kids):
            j = walk(j)
        return j

    i = 1
    for _ in range(schema[0].get_value(SE.NUM_CHILDREN, 0) or 0):
        first_leaf = leaf
        end = walk(i)
        out.append((i, end, list(range(first_leaf, leaf))))
        i = end
    if i != len(schema):
        raise Unsupported("malformed Parquet schema")
    return out


def column_levels(elements: list, name: str) -> tuple:
    """(is_list, max_rep, max_def, def_empty) of a top-level field's schema elements: a
    3-level list of a primitive (optional or required group, repeated group, leaf) or a
    primitive; anything else is Unsupported. A present value is at max_def; an empty
    list has its group defined and its repeated group absent."""
    reps = [e.get_value(SE.REPETITION_TYPE) for e in elements]
    max_def = sum(r != _REQUIRED for r in reps)
    max_rep = sum(r == _REPEATED for r in reps)
    if len(elements) == 3 and reps[1] == _REPEATED and reps[2] != _REPEATED:
        return True, max_rep, max_def, int(reps[0] == _OPTIONAL)
    if len(elements) == 1 and reps[0] != _REPEATED:
        return False, max_rep, max_def, 0
    raise Unsupported(f"{name}: nesting")


def chunk_range(md: T.Struct) -> tuple:
    """(first byte, length) of a column chunk from its ColumnMetaData: its first page is
    the dictionary (or index) page when there is one, else the first data page."""
    starts = [md.get_value(CMD.DATA_PAGE_OFFSET)] + [
        md.get_value(f) for f in (CMD.INDEX_PAGE_OFFSET, CMD.DICTIONARY_PAGE_OFFSET) if (md.get_value(f) or 0) > 0
    ]
    return min(starts), md.get_value(CMD.TOTAL_COMPRESSED_SIZE)
