"""Fake upstream APIs for connector tests; fixtures in ``tests.fakes.fixtures``."""
