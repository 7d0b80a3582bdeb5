"""Jobs run through Slurm: the Slurm job id, its state and node list as last seen, and the resources a cluster job
asks for (nodes, memory)

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("nodes", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("memory_gb", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("slurm_job_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("slurm_state", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("node_list", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for column in ("node_list", "slurm_state", "slurm_job_id", "memory_gb", "nodes"):
            batch_op.drop_column(column)
