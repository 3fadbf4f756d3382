"""deletion capability."""
