"""The HTTP API's route tables, in one list: what the app serves and the document describes.

Adding an operation is one `service.routing.Operation` in its capability's ``ROUTES``;
a new capability adds its table here.
"""

from __future__ import annotations

from service import me, ops
from service.audit import routes as audit_routes
from service.console import routes as console_routes
from service.contacts import routes as contact_routes
from service.deletion import routes as deletion_routes
from service.routing import RouteTable
from service.webhooks import routes as webhook_routes


def route_tables() -> tuple[RouteTable, ...]:
    """Every capability's route table."""
    return (
        contact_routes.ROUTES,
        deletion_routes.ROUTES,
        webhook_routes.ROUTES,
        audit_routes.ROUTES,
        ops.ROUTES,
        me.ROUTES,
        console_routes.ROUTES,
    )
