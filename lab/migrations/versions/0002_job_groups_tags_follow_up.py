"""job groups (sweeps), tags, and follow-up evaluations

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("group_name", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("tags", sa.JSON(), nullable=False, server_default=sa.text("'[]'")))
        batch_op.add_column(sa.Column("follow_up", sa.JSON(), nullable=True))
        batch_op.create_index("ix_jobs_group_name", ["group_name"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_group_name")
        batch_op.drop_column("follow_up")
        batch_op.drop_column("tags")
        batch_op.drop_column("group_name")
