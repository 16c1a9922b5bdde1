"""Parquet: a Thrift compact codec with named field ids (``thrift``), the footer and
append writer (``append``) and the page decoder for the mask's inputs (``read``)."""
