"""Synthetic hand radiographs with a known bone age (the built-in "phantom" dataset)."""
