"""datasets.job_id (the run that produced a dataset: generate, synthesize) and the rankings table (people's
orderings of a candidates dataset's answers, one per item and annotator)

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("job_id", sa.Integer(), nullable=True))
    op.create_table(
        "rankings",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("dataset_id", sa.Integer(), sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False),
        sa.Column("item", sa.String(length=128), nullable=False),
        sa.Column("annotator", sa.String(length=64), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("ranking", sa.JSON(), nullable=False),
        sa.Column("shown", sa.JSON(), nullable=False),
        sa.Column("into_dataset", sa.String(length=64), nullable=True),
        sa.Column("pairs_mode", sa.String(length=16), nullable=True),
        sa.Column("pairs_added", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("dataset_id", "item", "annotator", name="uq_rankings_item_annotator"),
    )


def downgrade() -> None:
    op.drop_table("rankings")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("job_id")
