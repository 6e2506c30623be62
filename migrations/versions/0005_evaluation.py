"""evaluation sets and model evaluations (the learning loop)

Revision ID: 0005
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "evaluation_set",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("policy", sa.String(length=64), nullable=False),
        sa.Column("study_ids", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluation_set")),
        sa.UniqueConstraint("task", name=op.f("uq_evaluation_set_task")),
    )
    op.create_table(
        "model_evaluation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("champion_version_id", sa.Integer(), nullable=True),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("n_studies", sa.Integer(), nullable=False),
        sa.Column("auc", sa.Double(), nullable=False),
        sa.Column("champion_auc", sa.Double(), nullable=True),
        sa.Column("p_value", sa.Double(), nullable=True),
        sa.Column("alpha", sa.Double(), nullable=False),
        sa.Column("promoted", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(length=512), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["champion_version_id"],
            ["model_version.id"],
            name=op.f("fk_model_evaluation_champion_version_id_model_version"),
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_version.id"],
            name=op.f("fk_model_evaluation_model_version_id_model_version"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_evaluation")),
    )
    with op.batch_alter_table("model_evaluation", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_model_evaluation_model_version_id"), ["model_version_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_model_evaluation_task"), ["task"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("model_evaluation", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_evaluation_task"))
        batch_op.drop_index(batch_op.f("ix_model_evaluation_model_version_id"))
    op.drop_table("model_evaluation")
    op.drop_table("evaluation_set")
