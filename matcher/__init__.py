"""matcher: match product photos and text; nightly recommendation, search and category tables."""

__version__ = "0.1.0"
