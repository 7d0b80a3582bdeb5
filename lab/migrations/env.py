"""Alembic environment: runs on the connection that lab.migrate hands over, inside its transaction."""

from alembic import context

from lab.tables import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
