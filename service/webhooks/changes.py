"""In-process news that an endpoint changed through the API, for this process's dispatchers."""

from __future__ import annotations

import uuid
from collections.abc import Callable

Listener = Callable[[uuid.UUID], None]


class EndpointChanges:
    """Tells this process's dispatchers, synchronously, that an endpoint's row changed
    (its URL, secrets, limits or status: PATCH, rotate-secret, enable) or was deleted.

    The API calls `changed` after its transaction committed and before it answers, so a
    send that starts after the answer is never made from what the dispatcher read
    before: it waits for the dispatcher's next pass, which reads the row again
    (`Dispatcher._watch_in`). Dispatchers in other processes see the change at their next
    pass (README "Webhooks": the bound).
    """

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(endpoint_id)` on every change; returns what stops that."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def changed(self, endpoint_id: uuid.UUID) -> None:
        """The endpoint's row changed (committed): every listener is told now."""
        for listener in list(self._listeners):
            listener(endpoint_id)
