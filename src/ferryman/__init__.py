"""ferryman: an identity-aware gateway for TCP services and PostgreSQL."""

__version__ = "0.1.0"
