"""re-scoring reopened studies (superseded predictions) and series image type for routing

Revision ID: 0004
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CURRENT = sa.text("NOT superseded")


def upgrade() -> None:
    with op.batch_alter_table("prediction", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("superseded", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        # A reopened study keeps its old prediction (history) and gets a new one from the same
        # model: uniqueness now holds only among current predictions.
        batch_op.drop_constraint("uq_prediction_study_id", type_="unique")
    op.create_index(
        "uq_prediction_current",
        "prediction",
        ["study_id", "model_version_id"],
        unique=True,
        sqlite_where=_CURRENT,
        postgresql_where=_CURRENT,
    )
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("image_type", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("image_type")
    op.drop_index("uq_prediction_current", table_name="prediction")
    op.execute(sa.text("DELETE FROM prediction WHERE superseded"))
    with op.batch_alter_table("prediction", schema=None) as batch_op:
        batch_op.create_unique_constraint(
            "uq_prediction_study_id", ["study_id", "model_version_id"]
        )
        batch_op.drop_column("superseded")
