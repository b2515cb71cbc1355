"""prelock keeps the code pages of running programs locked in memory."""

__version__ = "0.1.0"
