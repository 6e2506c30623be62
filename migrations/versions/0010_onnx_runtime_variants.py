"""runtime variants of model versions (ONNX fp32 / int8) and the runtime of each prediction

Revision ID: onnx_runtime_variants
Revises: security_hardening
Create Date: 2026-12-05 00:48:42.460525
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "onnx_runtime_variants"
down_revision: str | None = "security_hardening"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RUNTIME = sa.Enum(
    "torch-fp32", "onnx-fp32", "onnx-int8", name="variantruntime", native_enum=False, length=16
)
_CURRENT = sa.text("NOT superseded")


def upgrade() -> None:
    op.create_table(
        "model_variant",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("runtime", _RUNTIME, nullable=False),
        sa.Column("object_key", sa.String(length=255), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(length=512), nullable=False),
        sa.Column("serving", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_version.id"],
            name=op.f("fk_model_variant_model_version_id_model_version"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_variant")),
        sa.UniqueConstraint(
            "model_version_id", "runtime", name=op.f("uq_model_variant_model_version_id")
        ),
    )
    with op.batch_alter_table("model_variant", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_model_variant_model_version_id"), ["model_version_id"], unique=False
        )
    # Every prediction before this revision came from the PyTorch weights.
    with op.batch_alter_table("prediction", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("runtime", _RUNTIME, server_default="torch-fp32", nullable=False)
        )


def downgrade() -> None:
    # SQLite drops a column by copying the table, which would lose the partial index: it is
    # dropped first and made again after.
    op.drop_index("uq_prediction_current", table_name="prediction")
    with op.batch_alter_table("prediction", schema=None) as batch_op:
        batch_op.drop_column("runtime")
    op.create_index(
        "uq_prediction_current",
        "prediction",
        ["study_id", "model_version_id"],
        unique=True,
        sqlite_where=_CURRENT,
        postgresql_where=_CURRENT,
    )
    with op.batch_alter_table("model_variant", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_variant_model_version_id"))
    op.drop_table("model_variant")
