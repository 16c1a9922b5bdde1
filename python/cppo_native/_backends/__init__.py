"""Backends: array adoption and input checks (``arrays``, ``prepare``), the Rust CPU
backend (``cpu``) and the CUDA backend (``cuda``), chosen in one place (``dispatch``)."""
