"""Alembic migrations of the job store (``services.store``); applied by ``Store()`` on start-up.

A schema change is a new file in ``versions/`` (``alembic -c services/migrations/alembic.ini
revision --autogenerate -m "..."`` against a database at head), never an edit of an old one.
"""
