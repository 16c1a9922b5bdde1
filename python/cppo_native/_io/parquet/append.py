"""Writes ``cppo-mask``'s Parquet output by appending the CPPO columns to the input's
row groups instead of re-encoding the whole table.

The input's column chunks are copied byte for byte (``os.copy_file_range``: no
decompression, no decoding), so copied columns keep their encoding, compression and
statistics; the added columns are encoded by the Rust core (levels written as runs, in
O(rows)) and compressed with pyarrow's codecs; the footer is the input's, edited: the
new columns' schema elements and column chunks appended, offsets shifted, Arrow's
schema (``ARROW:schema``) replaced by the output's. The output row groups are the
input's. Page indexes and Bloom filters of copied columns are not carried over (they
hold absolute offsets); everything else in the footer is.

Readers see the same table as pyarrow's writer would produce (tested in
``tests/test_parquet_append.py``); ``cppo-mask --parquet-writer arrow`` re-encodes
everything with pyarrow instead.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import thrift as T
from .fields import ColumnChunk as CC
from .fields import ColumnMetaData as CMD
from .fields import DataPageHeader as DPH
from .fields import DictionaryPageHeader as DICT
from .fields import FileMetaData as FMD
from .fields import KeyValue as KV
from .fields import PageHeader as PH
from .fields import RowGroup as RG
from .fields import SchemaElement as SE
from ..._core.native import native_module
from .footer import Unsupported, _subtrees, chunk_range, column_levels, read_footer  # noqa: F401 (re-exported)

# parquet.thrift enums and field ids used here.
_PLAIN, _RLE, _RLE_DICTIONARY = 0, 3, 8
_DATA_PAGE, _DICTIONARY_PAGE = 0, 2
_CODECS = {"none": 0, "snappy": 1, "gzip": 2, "brotli": 4, "zstd": 6, "lz4": 7}  # lz4 = LZ4_RAW
_PYARROW_CODEC = {"snappy": "snappy", "gzip": "gzip", "brotli": "brotli", "zstd": "zstd", "lz4": "lz4_raw"}
# Level entries per data page (pages end at row boundaries; a longer row gets its own).
PAGE_VALUES = 1 << 20
# Encoded bytes of one row group's added columns kept in memory before spilling to a
# temporary file.
SPILL_BYTES = 256 << 20


def _footer_of(arrow_schema) -> T.Struct:
    """The footer pyarrow writes for an empty table of ``arrow_schema``."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.ParquetWriter(buf, arrow_schema).close()  # (pq.write_table would import pandas: 0.2 s)
    return read_footer(io.BytesIO(buf.getvalue()))


@dataclass
class _NewColumn:
    name: str
    kind: str  # "keep", "codes" or "f64"
    source: str  # "reason", "threshold", "row_budget" or "gate"
    ptype: int
    path: list
    is_list: bool
    max_rep: int
    max_def: int
    def_null: int
    def_empty: int
    def_present: int
    spool: "_Spool" = field(default=None)
    num_values: int = 0
    uncompressed: int = 0
    dict_bytes: int = 0


def _new_column(elements: list, name: str, kind: str, source: str) -> _NewColumn:
    """Levels of an added column from its schema elements (as pyarrow writes them)."""
    is_list, max_rep, max_def, def_empty = column_levels(elements, name)
    return _NewColumn(
        name=name, kind=kind, source=source, ptype=elements[-1].get_value(SE.TYPE), path=[e.get_value(SE.NAME) for e in elements],
        is_list=is_list, max_rep=max_rep, max_def=max_def, def_null=0, def_empty=def_empty,
        def_present=max_def,
    )


class _Spool:
    """Bytes of one column chunk: in memory, moved to a temporary file past a size."""

    def __init__(self, directory: str) -> None:
        self.parts: list = []
        self.size = 0
        self.file = None
        self.directory = directory

    def write(self, data) -> None:
        self.size += len(data)
        if self.file is None and self.size > SPILL_BYTES:
            self.file = tempfile.TemporaryFile(dir=self.directory)
            for p in self.parts:
                self.file.write(p)
            self.parts = []
        if self.file is not None:
            self.file.write(data)
        else:
            self.parts.append(data)

    def write_to(self, fd: int) -> None:
        if self.file is None:
            for p in self.parts:
                _write_all(fd, p)
            return
        self.file.flush()
        _copy(self.file.fileno(), fd, 0, self.size)
        self.file.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _copy(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Appends ``count`` bytes of ``src_fd`` from ``offset`` at ``dst_fd``'s position
    (in the kernel where it can: copy_file_range)."""
    use_cfr = hasattr(os, "copy_file_range")
    while count > 0:
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(count, 1 << 30), offset)
            except OSError:
                use_cfr = False
                continue
        else:
            data = os.pread(src_fd, min(count, 16 << 20), offset)
            if data:
                _write_all(dst_fd, data)
            n = len(data)
        if n <= 0:
            raise OSError(f"unexpected end of the input file at byte {offset}")
        offset += n
        count -= n


class AppendWriter:
    """Writes ``out_path``: the input's row groups (columns ``copy_fields``, None =
    all) with the CPPO columns appended. Feed it ``add(result)`` for consecutive
    batches of the input and ``end_row_group()`` after each input row group's last
    batch; then ``close()``.
    """

    def __init__(self, src_path: str, out_path: str, out_arrow_schema, copy_fields: Optional[list],
                 added: list, compression: str, meta: Optional[T.Struct] = None) -> None:
        """``added``: [(column name, source)] in output order, source one of "mask",
        "reason", "threshold", "row_budget", "gate". ``meta``: the input's footer if
        already parsed (it is only read)."""
        if compression not in _CODECS:
            raise ValueError(f"unsupported compression {compression!r}")
        self.codec = _CODECS[compression]
        self.pa_codec = _PYARROW_CODEC.get(compression)
        self.src = open(src_path, "rb")
        try:
            self.meta = meta if meta is not None else read_footer(self.src)
        except Exception:
            self.src.close()
            raise
        meta = self.meta
        if 8 in meta or 9 in meta:
            self._fail("encrypted Parquet file")
        schema = meta.get_value(FMD.SCHEMA).values
        subtrees = _subtrees(schema)
        n_fields = len(subtrees)
        n_out = len(out_arrow_schema)
        n_copied = n_out - len(added)
        if copy_fields is None:
            copy_fields = list(range(n_fields))
        if len(copy_fields) != n_copied:
            self._fail("schema mismatch")
        for i, fi in enumerate(copy_fields):
            if fi >= n_fields or schema[subtrees[fi][0]].get_value(SE.NAME) != out_arrow_schema.field(i).name.encode():
                self._fail("the Arrow schema does not follow the Parquet schema")
        for rg in meta.get_value(FMD.ROW_GROUPS).values:
            for cc in rg.get_value(RG.COLUMNS).values:
                if cc.get_value(CC.FILE_PATH) is not None or CC.CRYPTO_METADATA in cc or CC.ENCRYPTED_COLUMN_METADATA in cc:
                    self._fail("column chunks in other files or encrypted")
        self.copy_leaves = [leaf for fi in copy_fields for leaf in subtrees[fi][2]]
        self.all_copied = copy_fields == list(range(n_fields))

        # Schema elements, column orders and key-value metadata of the output, from the
        # footer pyarrow writes for the output schema (the added columns are its last
        # fields; its key-value metadata holds ARROW:schema).
        full_meta = _footer_of(out_arrow_schema)
        full_schema = full_meta.get_value(FMD.SCHEMA).values
        added_fields = _subtrees(full_schema)[n_copied:]
        added_elements = full_schema[added_fields[0][0]:] if added_fields else []
        added_leaves = sum(len(leaves) for _, _, leaves in added_fields)
        root = T.Struct(schema[0])
        elements = [root]
        for fi in copy_fields:
            a, b, _ = subtrees[fi]
            elements.extend(schema[a:b])
        elements.extend(added_elements)
        root.set(SE.NUM_CHILDREN, T.I32, n_copied + len(added))
        self.new_columns = []
        for (a, b, _), (name, source) in zip(added_fields, added):
            kind = {"mask": "keep", "reason": "codes"}.get(source, "f64")
            self.new_columns.append(_new_column(full_schema[a:b], name, kind, source))
        kv = list(full_meta.get_value(FMD.KEY_VALUE_METADATA, T.List(T.STRUCT, [])).values)
        from ..._core.version import __version__

        note = {"writer": f"cppo-native {__version__}", "appended_columns": [c.name for c in self.new_columns],
                "copied_from": meta.get_value(FMD.CREATED_BY, b"").decode("utf-8", "replace")}
        kv.append(T.Struct().set(KV.KEY, T.BINARY, b"cppo_native").set(KV.VALUE, T.BINARY, json.dumps(note).encode()))

        out = T.Struct()
        out.set(FMD.VERSION, T.I32, meta.get_value(FMD.VERSION, 1))
        out.set(FMD.SCHEMA, T.LIST, T.List(T.STRUCT, elements))
        out.set(FMD.KEY_VALUE_METADATA, T.LIST, T.List(T.STRUCT, kv))
        if 6 in meta:
            out[6] = meta[6]
        if 7 in meta:
            orders = meta.get_value(FMD.COLUMN_ORDERS).values
            all_orders = full_meta.get_value(FMD.COLUMN_ORDERS, T.List(T.STRUCT, [])).values
            new_orders = all_orders[len(all_orders) - added_leaves:] if added_leaves <= len(all_orders) else []
            if len(new_orders) == len(self.new_columns):
                out.set(FMD.COLUMN_ORDERS, T.LIST, T.List(T.STRUCT, [orders[i] for i in self.copy_leaves] + list(new_orders)))
        self.footer = out
        self.row_groups: list = []
        self.src_groups = meta.get_value(FMD.ROW_GROUPS).values
        self.rg_index = 0
        self.rows = 0

        self.out_dir = os.path.dirname(os.path.abspath(out_path))
        # No O_TRUNC on an empty file: on ext4, truncating makes close() wait for the
        # data to be allocated on disk (auto_da_alloc), which costs ~0.2 s per GB.
        self.fd = os.open(out_path, os.O_WRONLY | os.O_CREAT, 0o666)
        if os.fstat(self.fd).st_size:
            os.ftruncate(self.fd, 0)
        _write_all(self.fd, b"PAR1")
        self.pos = 4
        self._new_spools()

    def _fail(self, why: str):
        self.src.close()
        raise Unsupported(why)

    def _new_spools(self) -> None:
        for c in self.new_columns:
            c.spool = _Spool(self.out_dir)
            c.num_values = c.uncompressed = 0
            if c.kind == "codes":
                # Dictionary page: INT32 PLAIN [0, 1, 2, 3, 4]; index = reason code.
                self._page(c, [np.arange(5, dtype="<i4").tobytes()], dictionary=5)

    def _page(self, c: _NewColumn, parts: list, *, dictionary: int = 0, num_values: int = 0) -> None:
        """One page whose uncompressed body is the concatenation of ``parts``."""
        raw_size = sum(len(p) for p in parts)
        data = self._compress(parts, raw_size)
        head = T.Struct()
        head.set(PH.TYPE, T.I32, _DICTIONARY_PAGE if dictionary else _DATA_PAGE)
        head.set(PH.UNCOMPRESSED_PAGE_SIZE, T.I32, raw_size)
        head.set(PH.COMPRESSED_PAGE_SIZE, T.I32, sum(len(p) for p in data))
        if dictionary:
            head.set(PH.DICTIONARY_PAGE_HEADER, T.STRUCT,
                     T.Struct().set(DICT.NUM_VALUES, T.I32, dictionary).set(DICT.ENCODING, T.I32, _PLAIN))
        else:
            dph = T.Struct().set(DPH.NUM_VALUES, T.I32, num_values)
            dph.set(DPH.ENCODING, T.I32, _RLE_DICTIONARY if c.kind == "codes" else _PLAIN)
            dph.set(DPH.DEFINITION_LEVEL_ENCODING, T.I32, _RLE).set(DPH.REPETITION_LEVEL_ENCODING, T.I32, _RLE)
            head.set(PH.DATA_PAGE_HEADER, T.STRUCT, dph)
            c.num_values += num_values
        header = T.dumps(head)
        c.spool.write(header)
        for p in data:
            c.spool.write(p)
        c.uncompressed += len(header) + raw_size
        if dictionary:
            c.dict_bytes = len(header) + sum(len(p) for p in data)

    def _compress(self, parts: list, raw_size: int) -> list:
        """The compressed page body, as a list of buffers.

        Snappy's raw format is a varint of the uncompressed size followed by elements
        whose back-references are relative and never reach before their own part, so
        the compressed parts are concatenated under one size header: the values are
        compressed straight from the mask's output array, without a copy into the page."""
        import pyarrow as pa

        # (Buffer.slice: the buffer protocol of compress()'s resizable result exposes
        # its capacity, not its size.)
        if self.pa_codec is None:
            return parts
        if self.pa_codec == "snappy":
            out = [T.varint(raw_size)]
            for p in parts:
                if len(p):
                    body = pa.compress(p, codec="snappy", asbytes=False)
                    out.append(body.slice(T.varint_length(body.slice(0, min(10, body.size)))))
            return out
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        body = pa.compress(joined, codec=self.pa_codec, asbytes=False)
        return [body.slice(0, body.size)]

    def add(self, offsets: np.ndarray, nulls: Optional[np.ndarray], values: dict) -> None:
        """One batch: ``offsets`` int64 [rows + 1] of the (non-null) token lists,
        ``nulls`` bool [rows] or None, ``values``: "reason" int8 and "threshold",
        "row_budget", "gate" float64 arrays (the present values only)."""
        native = native_module()
        rows = offsets.shape[0] - 1
        nulls = None if nulls is None or not nulls.any() else np.ascontiguousarray(nulls, dtype=np.bool_)
        for c in self.new_columns:
            src = "reason" if c.source == "mask" else c.source
            arr = values[src]
            if not c.is_list and nulls is not None:
                arr = arr[~nulls]
            codes = np.ascontiguousarray(arr) if c.kind != "f64" else None
            floats = np.ascontiguousarray(arr, dtype=np.float64) if c.kind == "f64" else None
            # Doubles stay in their array: pages hold the levels, the values are appended
            # (or compressed) from `floats` directly.
            kind = "f64_levels" if c.kind == "f64" else c.kind
            buf, ends, stats = native.encode_parquet_pages(
                kind, rows, offsets if c.is_list else None, nulls, codes, floats,
                c.max_rep, c.max_def, c.def_null, c.def_empty, c.def_present, PAGE_VALUES,
            )
            start = value = 0
            mv = memoryview(buf)
            values_bytes = memoryview(floats).cast("B") if floats is not None else None
            for p, end in enumerate(ends.tolist()):
                parts = [mv[start:end]]
                if values_bytes is not None:
                    present = int(stats[3 * p + 2])
                    parts.append(values_bytes[8 * value:8 * (value + present)])
                    value += present
                self._page(c, parts, num_values=int(stats[3 * p]))
                start = end
        self.rows += rows

    def end_row_group(self) -> None:
        """Writes the current input row group's copied chunks and the added columns."""
        src_rg = self.src_groups[self.rg_index]
        num_rows = src_rg.get_value(RG.NUM_ROWS)
        if self.rows != num_rows:
            raise ValueError(f"row group {self.rg_index} has {num_rows} rows, {self.rows} were added")
        self.rg_index += 1
        if num_rows == 0:  # nothing to copy or add: the output has no such row group
            self._new_spools()
            return
        rg_start = self.pos
        chunks = []
        total_unc = total_comp = 0
        src_fd = self.src.fileno()
        for leaf in self.copy_leaves:
            cc = T.Struct(src_rg.get_value(RG.COLUMNS).values[leaf])
            md = T.Struct(cc.get_value(CC.META_DATA))
            start, length = chunk_range(md)
            _copy(src_fd, self.fd, start, length)
            delta = self.pos - start
            for fid in CMD.PAGE_OFFSETS:
                if md.get_value(fid) is not None and md.get_value(fid) > 0:
                    md.set(fid, T.I64, md.get_value(fid) + delta)
            md.pop(CMD.BLOOM_FILTER_OFFSET, None)  # Bloom filter: not copied
            md.pop(CMD.BLOOM_FILTER_LENGTH, None)
            for fid in CC.PAGE_INDEX:  # page indexes: not copied
                cc.pop(fid, None)
            if cc.get_value(CC.FILE_OFFSET):
                cc.set(CC.FILE_OFFSET, T.I64, cc.get_value(CC.FILE_OFFSET) + delta)
            cc.set(CC.META_DATA, T.STRUCT, md)
            chunks.append(cc)
            self.pos += length
            total_unc += md.get_value(CMD.TOTAL_UNCOMPRESSED_SIZE)
            total_comp += length
        for c in self.new_columns:
            start = self.pos
            c.spool.write_to(self.fd)
            size = c.spool.size
            self.pos += size
            md = T.Struct()
            md.set(CMD.TYPE, T.I32, c.ptype)
            encodings = [_PLAIN, _RLE, _RLE_DICTIONARY] if c.kind == "codes" else [_PLAIN, _RLE]
            md.set(CMD.ENCODINGS, T.LIST, T.List(T.I32, encodings))
            md.set(CMD.PATH_IN_SCHEMA, T.LIST, T.List(T.BINARY, list(c.path)))
            md.set(CMD.CODEC, T.I32, self.codec)
            md.set(CMD.NUM_VALUES, T.I64, c.num_values)
            md.set(CMD.TOTAL_UNCOMPRESSED_SIZE, T.I64, c.uncompressed)
            md.set(CMD.TOTAL_COMPRESSED_SIZE, T.I64, size)
            if c.kind == "codes":
                md.set(CMD.DICTIONARY_PAGE_OFFSET, T.I64, start)
                md.set(CMD.DATA_PAGE_OFFSET, T.I64, start + c.dict_bytes)
            else:
                md.set(CMD.DATA_PAGE_OFFSET, T.I64, start)
            chunks.append(T.Struct().set(CC.FILE_OFFSET, T.I64, 0).set(CC.META_DATA, T.STRUCT, md))
            total_unc += c.uncompressed
            total_comp += size
            c.spool.close()
        rg = T.Struct()
        rg.set(RG.COLUMNS, T.LIST, T.List(T.STRUCT, chunks))
        rg.set(RG.TOTAL_BYTE_SIZE, T.I64, total_unc)
        rg.set(RG.NUM_ROWS, T.I64, num_rows)
        if self.all_copied and 4 in src_rg:
            rg[4] = src_rg[4]
        rg.set(RG.FILE_OFFSET, T.I64, rg_start)
        rg.set(RG.TOTAL_COMPRESSED_SIZE, T.I64, total_comp)
        rg.set(RG.ORDINAL, T.I16, len(self.row_groups))
        self.row_groups.append(rg)
        self.rows = 0
        self._new_spools()

    def close(self) -> None:
        """Writes the footer and closes the files."""
        if self.rg_index != len(self.src_groups):
            raise ValueError(f"{self.rg_index} of {len(self.src_groups)} row groups written")
        self.footer.set(FMD.NUM_ROWS, T.I64, sum(rg.get_value(RG.NUM_ROWS) for rg in self.row_groups))
        self.footer.set(FMD.ROW_GROUPS, T.LIST, T.List(T.STRUCT, self.row_groups))
        data = T.dumps(self.footer)
        _write_all(self.fd, data + len(data).to_bytes(4, "little") + b"PAR1")
        self.abort()

    def abort(self) -> None:
        for c in self.new_columns:
            if c.spool is not None:
                c.spool.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.src.close()
