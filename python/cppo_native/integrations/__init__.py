"""Trainer integrations (each module imports its trainer; nothing is imported here)."""
