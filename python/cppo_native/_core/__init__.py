"""Core definitions at the bottom of the package: the knob table, integer codes, error
messages and the native extension's loader. Imports nothing else of cppo_native."""
