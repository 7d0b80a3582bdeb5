"""jobs.devices and jobs.processes: what a job asks of a worker; workers.capacity: what a worker owns; the queue
index in claim order (priority descending, id ascending), so a claim reads one index entry however long the queue

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("devices", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("processes", sa.Integer(), nullable=False, server_default=sa.text("1")))
    op.drop_index("ix_jobs_status_priority", table_name="jobs")
    op.create_index("ix_jobs_claim_order", "jobs", ["status", sa.text("priority DESC"), "id"], unique=False)
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("capacity", sa.String(length=256), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("capacity")
    op.drop_index("ix_jobs_claim_order", table_name="jobs")
    op.create_index("ix_jobs_status_priority", "jobs", ["status", "priority", "id"], unique=False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("processes")
        batch_op.drop_column("devices")
