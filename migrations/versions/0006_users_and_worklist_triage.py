"""dashboard users, login attempts, worklist triage columns

Revision ID: 0006
Revises: 0002
Create Date: 2026-11-22 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "app_user",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_app_user")),
        sa.UniqueConstraint("name", name=op.f("uq_app_user_name")),
    )
    op.create_table(
        "login_attempt",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("client", sa.String(length=64), nullable=False),
        sa.Column("succeeded", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_login_attempt")),
    )
    with op.batch_alter_table("login_attempt", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_login_attempt_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_login_attempt_client"), ["client"], unique=False)
        batch_op.create_index(batch_op.f("ix_login_attempt_username"), ["username"], unique=False)

    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(sa.Column("latest_prediction_id", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("triage_rank", sa.Integer(), nullable=False, server_default="2")
        )
        batch_op.create_index(
            batch_op.f("ix_study_latest_prediction_id"), ["latest_prediction_id"], unique=False
        )
        batch_op.create_index("ix_study_triage", ["triage_rank", "received_at", "id"], unique=False)
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.alter_column("triage_rank", server_default=None)

    # Studies scored before this revision: point at their latest prediction and rank them.
    op.execute(
        """
        UPDATE study SET latest_prediction_id =
            (SELECT max(p.id) FROM prediction p WHERE p.study_id = study.id)
        """
    )
    op.execute(
        """
        UPDATE study SET triage_rank =
            (SELECT CASE WHEN p.score >= m.threshold THEN 0 ELSE 1 END
             FROM prediction p JOIN model_version m ON m.id = p.model_version_id
             WHERE p.id = study.latest_prediction_id)
        WHERE latest_prediction_id IS NOT NULL
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index("ix_study_triage")
        batch_op.drop_index(batch_op.f("ix_study_latest_prediction_id"))
        batch_op.drop_column("triage_rank")
        batch_op.drop_column("latest_prediction_id")

    with op.batch_alter_table("login_attempt", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_login_attempt_username"))
        batch_op.drop_index(batch_op.f("ix_login_attempt_client"))
        batch_op.drop_index(batch_op.f("ix_login_attempt_at"))
    op.drop_table("login_attempt")
    op.drop_table("app_user")
