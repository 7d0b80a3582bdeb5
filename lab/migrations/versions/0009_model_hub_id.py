"""models.hub_id and models.revision: a model registered from the local Hugging Face cache keeps the hub id and the
snapshot's commit it was registered at

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hub_id", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("revision", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("revision")
        batch_op.drop_column("hub_id")
