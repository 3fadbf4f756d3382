"""Alembic migrations of the service's schema (run by `contact-deletion migrate`)."""
