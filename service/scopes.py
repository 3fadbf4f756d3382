"""The scopes an API key can hold (DESIGN §3). A module of its own so that the CLI can
list them without importing the database layer."""

SCOPES = ("contacts:read", "contacts:write", "webhooks:manage", "audit:read")
