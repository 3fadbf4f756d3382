"""Erasure: a deleted contact's bytes leave the database files, and the service can prove it.

- ``scrubber``: after deletions commit, checkpoints and truncates SQLite's WAL, or vacuums
  PostgreSQL's touched tables, within ``ERASURE_DELAY_S``;
- ``redact``: the ``redact_timeline`` option, pure text redaction of a contact's values;
- ``check``: ``contact-deletion erasure check``, which searches every place the service
  writes for an address.
"""
