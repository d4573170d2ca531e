"""The `kvrun` command line."""
