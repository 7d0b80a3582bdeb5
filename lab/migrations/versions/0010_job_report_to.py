"""jobs.report_to: the experiment trackers a job writes to beside the lab's own metrics (comma-separated names of
wandb, tensorboard, trackio, mlflow; empty for none; NULL for the settings' default, as before)

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("report_to", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("report_to")
