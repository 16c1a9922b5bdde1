"""The package version (also the Rust crates' version; tests/test_knobs.py checks them)."""

__version__ = "0.1.0"
