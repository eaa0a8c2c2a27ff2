"""Sweep and trial configuration: the YAML schema, validation, overrides, and finding a sweep by name."""
