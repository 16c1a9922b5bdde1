"""Reads the mask's input columns of a Parquet row group with cppo-native's page decoder
(``rust/cppo-core/src/parquet_read.rs``) instead of pyarrow's.

pyarrow materialises a repetition and a definition level per token and derives the
offsets and validity bitmaps from them; on a file of only log-probs that is most of the
CLI's read time. Here page headers are parsed with the Thrift codec, pages are
decompressed with pyarrow's codecs straight from a memory map, and the Rust decoder walks
the levels as runs and copies (or dictionary-decodes) the values once.

It handles what rollout files hold: lists (or large lists) of floats, doubles or
integers (response masks as 0/1 integers) and such numbers per row, PLAIN or
dictionary-encoded, v1 or v2 data pages, any codec
pyarrow has but Hadoop-framed LZ4, and no nulls (empty lists are fine). For anything
else — a null, another type or encoding, a row group too large to decode whole —
:meth:`FastReader.read` returns None and the caller reads that row group with pyarrow:
the same table, decoded by pyarrow (``tests/test_parquet_read.py`` checks both agree).
"""

from __future__ import annotations

import mmap
from typing import Optional

import numpy as np

from . import thrift as T
from .fields import ColumnChunk as CC
from .fields import ColumnMetaData as CMD
from .fields import DataPageHeader as DPH
from .fields import DataPageHeaderV2 as V2
from .fields import DictionaryPageHeader as DICT
from .fields import FileMetaData as FMD
from .fields import PageHeader as PH
from .fields import RowGroup as RG
from .fields import SchemaElement as SE
from ..._core.native import native_module
from .footer import Unsupported, _subtrees, chunk_range, column_levels, read_footer

_CODEC_NAMES = {1: "snappy", 2: "gzip", 4: "brotli", 6: "zstd", 7: "lz4_raw"}
_INT32, _INT64, _FLOAT, _DOUBLE = 1, 2, 4, 5
_RLE = 3
# Largest column chunk decoded whole (level entries): with three row groups in flight,
# about 1 GB at most; larger row groups stream through pyarrow in --batch-rows batches.
MAX_CHUNK_VALUES = 1 << 24
_EMPTY = np.zeros(0, np.uint8)


class _Column:
    def __init__(self, name: str, leaf: int, elements: list, arrow_type) -> None:
        import pyarrow as pa

        self.name = name
        self.leaf = leaf
        self.arrow_type = arrow_type
        leaf_el = elements[-1]
        ptype = leaf_el.get_value(SE.TYPE)
        if ptype not in (_INT32, _INT64, _FLOAT, _DOUBLE):
            raise Unsupported(f"{name}: physical type {ptype}")
        self.width = 4 if ptype in (_INT32, _FLOAT) else 8
        self.is_list, self.max_rep, self.max_def, self.def_empty = column_levels(elements, name)
        if self.is_list and not (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)):
            raise Unsupported(f"{name}: Arrow type {arrow_type}")
        value_type = arrow_type.value_type if self.is_list else arrow_type
        kinds = {  # Arrow value type -> (physical type, stored as, NumPy type of the Arrow array)
            pa.float32(): (_FLOAT, "<f4", "<f4"), pa.float64(): (_DOUBLE, "<f8", "<f8"),
            pa.int32(): (_INT32, "<i4", "<i4"), pa.int64(): (_INT64, "<i8", "<i8"),
            pa.uint32(): (_INT32, "<u4", "<u4"), pa.uint64(): (_INT64, "<u8", "<u8"),
            pa.int8(): (_INT32, "<i4", "i1"), pa.int16(): (_INT32, "<i4", "<i2"),
            pa.uint8(): (_INT32, "<i4", "u1"), pa.uint16(): (_INT32, "<i4", "<u2"),
        }
        kind = kinds.get(value_type)
        if kind is None or kind[0] != ptype:
            raise Unsupported(f"{name}: Arrow type {arrow_type}")
        self.value_type = value_type
        self.dtype = np.dtype(kind[1])  # as stored (PLAIN bytes)
        self.arrow_dtype = np.dtype(kind[2])  # narrower integers are cast down


class FastReader:
    """``read(i)``: row group ``i``'s columns ``names`` as a RecordBatch, or None."""

    def __init__(self, path: str, arrow_schema, names: list, meta: Optional[T.Struct] = None) -> None:
        """``meta``: the file's footer if already parsed (it is only read)."""
        import pyarrow as pa

        self.fh = open(path, "rb")
        try:
            self.meta = meta if meta is not None else read_footer(self.fh)
            schema = self.meta.get_value(FMD.SCHEMA).values
            top = _subtrees(schema)
            by_name = {schema[a].get_value(SE.NAME).decode("utf-8", "replace"): (a, b, leaves) for a, b, leaves in top}
            self.columns = []
            for name in names:
                if name not in by_name:
                    raise Unsupported(f"column {name!r} not found")
                a, b, leaves = by_name[name]
                if len(leaves) != 1:
                    raise Unsupported(f"{name}: several leaves")
                self.columns.append(_Column(name, leaves[0], schema[a:b], arrow_schema.field(name).type))
            self.schema = pa.schema([arrow_schema.field(name) for name in names])
            self.map = mmap.mmap(self.fh.fileno(), 0, access=mmap.ACCESS_READ)
        except BaseException:
            self.fh.close()
            raise
        self.view = memoryview(self.map)
        self.groups = self.meta.get_value(FMD.ROW_GROUPS).values
        self.native = native_module()

    @classmethod
    def open(cls, path: str, arrow_schema, names: list, meta: Optional[T.Struct] = None) -> Optional["FastReader"]:
        """A reader, or None when these columns are not decodable here."""
        try:
            return cls(path, arrow_schema, names, meta)
        except (Unsupported, T.ThriftError, OSError, ValueError, KeyError):
            return None

    def close(self) -> None:
        self.view.release()
        self.map.close()
        self.fh.close()

    def read(self, index: int):
        """Row group ``index`` as a RecordBatch of the columns, or None (use pyarrow)."""
        try:
            return self._read(index)
        except (Unsupported, T.ThriftError, ValueError, KeyError, IndexError, OSError):
            return None

    def _read(self, index: int):
        import pyarrow as pa

        rg = self.groups[index]
        rows = rg.get_value(RG.NUM_ROWS)
        chunks = rg.get_value(RG.COLUMNS).values
        arrays = []
        for col in self.columns:
            md = chunks[col.leaf].get_value(CC.META_DATA)
            if md is None:
                raise Unsupported("no column metadata")
            if md.get_value(CMD.NUM_VALUES) > MAX_CHUNK_VALUES:
                raise Unsupported("row group too large to decode whole")
            values, offsets = self._decode(col, md)
            if col.arrow_dtype != col.dtype:
                values = values.astype(col.arrow_dtype)
            n = offsets.shape[0] - 1
            if n != rows:
                raise Unsupported(f"{col.name}: {n} rows, the row group has {rows}")
            child = pa.Array.from_buffers(col.value_type, values.shape[0], [None, pa.py_buffer(values)])
            if col.is_list:
                large = pa.types.is_large_list(col.arrow_type)
                if not large and offsets[-1] > np.iinfo(np.int32).max:
                    raise Unsupported("offsets overflow int32")
                off = offsets if large else offsets.astype(np.int32)
                arrays.append(pa.Array.from_buffers(col.arrow_type, rows, [None, pa.py_buffer(off)], children=[child]))
            else:
                arrays.append(child)
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def _decode(self, col: _Column, md: T.Struct):
        import pyarrow as pa

        codec = md.get_value(CMD.CODEC)
        if codec != 0 and codec not in _CODEC_NAMES:
            raise Unsupported(f"codec {codec}")
        name = _CODEC_NAMES.get(codec)
        pos, length = chunk_range(md)
        end = pos + length
        if end > len(self.view):
            raise Unsupported("column chunk past the end of the file")
        total = md.get_value(CMD.NUM_VALUES)
        kinds, counts, encodings, reps, defs, bodies = [], [], [], [], [], []
        seen = 0

        def page(kind, count, encoding, body, rep=_EMPTY, deflevels=_EMPTY):
            kinds.append(kind)
            counts.append(count)
            encodings.append(encoding)
            reps.append(rep)
            defs.append(deflevels)
            bodies.append(body)

        def inflate(data, size):
            if name is None:
                return np.frombuffer(data, np.uint8)
            out = pa.decompress(data, decompressed_size=size, codec=name, asbytes=False)
            return np.frombuffer(out, np.uint8, count=size)

        while seen < total:
            if pos >= end:
                raise Unsupported("column chunk ends early")
            head, used = T.loads(self.view[pos:min(end, pos + (1 << 16))])
            ptype = head.get_value(PH.TYPE)
            usize, csize = head.get_value(PH.UNCOMPRESSED_PAGE_SIZE), head.get_value(PH.COMPRESSED_PAGE_SIZE)
            body = self.view[pos + used:pos + used + csize]
            pos += used + csize
            if ptype == 2:  # dictionary page
                dph = head.get_value(PH.DICTIONARY_PAGE_HEADER)
                page(0, dph.get_value(DICT.NUM_VALUES), dph.get_value(DICT.ENCODING), inflate(body, usize))
            elif ptype == 0:  # data page v1
                dph = head.get_value(PH.DATA_PAGE_HEADER)
                if (col.max_def and dph.get_value(DPH.DEFINITION_LEVEL_ENCODING) != _RLE) or (
                        col.max_rep and dph.get_value(DPH.REPETITION_LEVEL_ENCODING) != _RLE):
                    raise Unsupported("level encoding")
                page(1, dph.get_value(DPH.NUM_VALUES), dph.get_value(DPH.ENCODING), inflate(body, usize))
                seen += dph.get_value(DPH.NUM_VALUES)
            elif ptype == 3:  # data page v2: levels uncompressed, then the values
                h = head.get_value(PH.DATA_PAGE_HEADER_V2)  # (num_nulls counts empty lists too: the levels decide)
                dl, rl = h.get_value(V2.DEFINITION_LEVELS_BYTE_LENGTH), h.get_value(V2.REPETITION_LEVELS_BYTE_LENGTH)
                values = body[rl + dl:]
                compressed = h.get_value(V2.IS_COMPRESSED, True) and name is not None
                page(2, h.get_value(V2.NUM_VALUES), h.get_value(V2.ENCODING),
                     inflate(values, usize - rl - dl) if compressed else np.frombuffer(values, np.uint8),
                     np.frombuffer(body[:rl], np.uint8), np.frombuffer(body[rl:rl + dl], np.uint8))
                seen += h.get_value(V2.NUM_VALUES)
            elif ptype == 1:  # index page: nothing to read
                continue
            else:
                raise Unsupported(f"page type {ptype}")
        values, offsets, why = self.native.decode_parquet_chunk(
            kinds, counts, encodings, reps, defs, bodies, col.max_rep, col.max_def, col.max_def, col.def_empty,
            col.width,
        )
        if why is not None:
            raise Unsupported(why)
        return values.view(col.dtype), offsets
