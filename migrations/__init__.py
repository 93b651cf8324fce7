"""Alembic environment and versions; run them with :mod:`pipeline.migrate` or ``pipeline migrate``."""
