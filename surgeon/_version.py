"""The package version, recorded in every recipe surgeon writes."""

__version__ = "0.1.0"
