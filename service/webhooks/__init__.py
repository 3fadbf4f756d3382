"""webhooks capability."""
