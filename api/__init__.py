"""The REST API (FastAPI): routes, request/response schemas, API-key auth. Thin: the work
is in ``services``. Run it with ``uvicorn api.main:app``."""
