"""merge ingest, learning and dashboard schema branches

Revision ID: 0007
Revises: 0004, 0005, 0006
Create Date: 2026-11-22 01:21:30.700509
"""

from collections.abc import Sequence

revision: str = "0007"
down_revision: str | Sequence[str] | None = ("0004", "0005", "0006")
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
