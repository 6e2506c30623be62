"""leases: exclusive work (scoring, training) renewed while it runs, expiring soon after a crash

Revision ID: production_leases
Revises: onnx_runtime_variants
Create Date: 2026-12-01 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "production_leases"
down_revision: str | Sequence[str] | None = "onnx_runtime_variants"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "lease",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("holder", sa.String(length=255), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_lease")),
    )
    # Trainings marked running before leases existed have no lease: none of them is alive any
    # more once the schema changes under them, so they end as abandoned.
    op.execute(
        "UPDATE training_run SET status = 'abandoned', "
        "error = 'abandoned when training leases were introduced' WHERE status = 'running'"
    )


def downgrade() -> None:
    op.drop_table("lease")
