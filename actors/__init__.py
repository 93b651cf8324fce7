"""Dramatiq wiring: the broker, the actors (thin: IDs in, one pipeline call) and middleware."""
