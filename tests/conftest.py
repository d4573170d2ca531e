"""Shared pytest configuration. Shared fixtures live in tests/support/ modules."""
