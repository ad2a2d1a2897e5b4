"""The package version, at the bottom of the import graph (PNG metadata, checkpoints and the server)."""

__version__ = "0.1.0"
