"""Alembic environment: runs on the connection ``services.store.migrate`` hands over, or,
from the ``alembic`` command line, on ``QPA_DATABASE_URL`` (default: SQLite under QPA_HOME)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from services.store import Base

config = context.config


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      # SQLite alters tables by copying them; batch mode does that for us.
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:  # the alembic command line
    from services.settings import get_settings

    engine = create_engine(get_settings().resolved_database_url)
    with engine.connect() as cli_connection:
        _run(cli_connection)
    engine.dispose()
