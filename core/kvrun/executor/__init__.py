"""The multiprocess executor: worker processes driven over a shared-memory broadcast."""
