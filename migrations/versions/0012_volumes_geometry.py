"""volumes: instance geometry for series assembly, and each task's outcome per study

Revision ID: volumes_geometry
Revises: production_leases
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "volumes_geometry"
down_revision: str | None = "production_leases"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STATUSES = ("receiving", "stable", "processing", "scored", "reviewed", "failed", "no_model")


def upgrade() -> None:
    op.create_table(
        "task_outcome",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(*_STATUSES, name="studystatus", native_enum=False, length=16),
            nullable=False,
        ),
        sa.Column("reason", sa.String(length=1024), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_version.id"],
            name=op.f("fk_task_outcome_model_version_id_model_version"),
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["study.id"],
            name=op.f("fk_task_outcome_study_id_study"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_outcome")),
        sa.UniqueConstraint("study_id", "task", name=op.f("uq_task_outcome_study_id")),
    )
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(sa.Column("image_type", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("image_position", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("image_orientation", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("pixel_spacing", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("temporal_position", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_column("temporal_position")
        batch_op.drop_column("pixel_spacing")
        batch_op.drop_column("image_orientation")
        batch_op.drop_column("image_position")
        batch_op.drop_column("image_type")
    op.drop_table("task_outcome")
