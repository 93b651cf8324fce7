"""OAuth2 tokens per company, shared by every worker (issue 15).

Revision ID: 0006
Revises: 0005_error_codes
Create Date: 2026-12-01

One row per company: the sealed access token and its expiry, the sealed (rotated) refresh
token, and whether the grant was revoked. Refreshes lock the row (``pipeline.oauth_tokens``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import pipeline.models

revision: str = "0006"
down_revision: str | None = "0005_error_codes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONType = pipeline.models.JSONType
UTCDateTime = pipeline.models.UTCDateTime


def upgrade() -> None:
    op.create_table(
        "oauth_tokens",
        sa.Column("company_id", pipeline.models.BigId, nullable=False),
        sa.Column("grant_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("access_token", JSONType, nullable=True),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("refresh_token", JSONType, nullable=True),
        sa.Column("revoked_reason", sa.Text(), nullable=True),
        sa.Column("refreshes", sa.Integer(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["company_id"], ["companies.id"], name=op.f("fk_oauth_tokens_company_id_companies"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("company_id", name=op.f("pk_oauth_tokens")),
    )


def downgrade() -> None:
    op.drop_table("oauth_tokens")
