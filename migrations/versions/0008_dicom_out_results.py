"""results out as DICOM: SR/SEG result objects and their deliveries to destinations

Revision ID: dicom_out_results
Revises: 0007
Create Date: 2026-12-05 00:52:27.889532
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "dicom_out_results"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "delivery",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("sr", "seg", name="resultkind", native_enum=False, length=8),
            nullable=False,
        ),
        sa.Column("object_key", sa.String(length=255), nullable=False),
        sa.Column("destination", sa.String(length=64), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending", "sent", "parked", name="deliverystatus", native_enum=False, length=8
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.String(length=1024), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_id"], ["study.id"], name=op.f("fk_delivery_study_id_study"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery")),
        sa.UniqueConstraint("object_key", "destination", name=op.f("uq_delivery_object_key")),
    )
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.create_index("ix_delivery_due", ["status", "next_attempt_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_delivery_study_id"), ["study_id"], unique=False)

    op.create_table(
        "result_object",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prediction_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("sr", "seg", name="resultkind", native_enum=False, length=8),
            nullable=False,
        ),
        sa.Column("object_key", sa.String(length=255), nullable=True),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("error", sa.String(length=1024), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["prediction_id"],
            ["prediction.id"],
            name=op.f("fk_result_object_prediction_id_prediction"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["study.id"],
            name=op.f("fk_result_object_study_id_study"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_result_object")),
        sa.UniqueConstraint("prediction_id", "kind", name=op.f("uq_result_object_prediction_id")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_result_object_sop_instance_uid")),
    )
    with op.batch_alter_table("result_object", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_result_object_prediction_id"), ["prediction_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_result_object_study_id"), ["study_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("result_object", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_result_object_study_id"))
        batch_op.drop_index(batch_op.f("ix_result_object_prediction_id"))

    op.drop_table("result_object")
    with op.batch_alter_table("delivery", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_delivery_study_id"))
        batch_op.drop_index("ix_delivery_due")

    op.drop_table("delivery")
