"""File I/O below the public faces: Parquet reading and appending, the CLI's pipeline."""
