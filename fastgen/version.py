"""fastgen's version (written into every checkpoint)."""

__version__ = "0.2.0"
