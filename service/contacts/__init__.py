"""contacts capability."""
