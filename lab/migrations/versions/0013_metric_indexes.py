"""Indexes for reading long runs fast: the (key, job, step) index also holds the value, so the curves of a
metric are read from the index alone; (job, id) serves a run's points and the points it logged since the last read

Revision ID: 0013
Revises: 0012
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.drop_index("ix_metrics_key_job_step")
        batch_op.create_index("ix_metrics_key_job_step_value", ["key", "job_id", "step", "value"], unique=False)
        batch_op.create_index("ix_metrics_job_id", ["job_id", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.drop_index("ix_metrics_job_id")
        batch_op.drop_index("ix_metrics_key_job_step_value")
        batch_op.create_index("ix_metrics_key_job_step", ["key", "job_id", "step"], unique=False)
