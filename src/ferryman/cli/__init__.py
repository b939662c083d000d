"""Command-line entry points (``ferryman …``)."""
