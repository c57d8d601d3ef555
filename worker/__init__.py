"""The Celery worker: the app (``worker.app``) and one thin task (``worker.tasks``).

Start it with ``celery -A worker.app worker --concurrency 1``; everything it does is in
``services.runner``.
"""
