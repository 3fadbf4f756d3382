"""The web console (``/console``) and the API reference (``/docs``), served by the API.

The console is a static page of plain ES modules that calls the public API with the key
the user typed (kept in ``sessionStorage``); the reference is Swagger UI, whose files come
from the PyPI package ``swagger-ui-py`` and are served from here, so neither needs a CDN.
"""
