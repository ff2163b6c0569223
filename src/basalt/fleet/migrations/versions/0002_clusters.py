"""Clusters from templates: the clusters table, and each machine's role, set and
intended config.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from basalt.fleet.db import UTCDateTime

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "clusters",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("template", sa.Text(), nullable=False),
        sa.Column("secrets", sa.LargeBinary(), nullable=False),
        sa.Column("endpoint", sa.String(253), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("bootstrapped", sa.Boolean(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("drifted", sa.Integer(), nullable=False),
        sa.Column("created", UTCDateTime(), nullable=False),
        sa.Column("updated", UTCDateTime(), nullable=False),
    )
    with op.batch_alter_table("machines") as batch:
        batch.add_column(sa.Column("role", sa.String(16), nullable=False, server_default=""))
        batch.add_column(sa.Column("machine_set", sa.String(63), nullable=False, server_default=""))
        batch.add_column(sa.Column("intended", sa.LargeBinary(), nullable=True))
        batch.add_column(
            sa.Column("intended_digest", sa.String(64), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("allocated", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        for column in ("allocated", "intended_digest", "intended", "machine_set", "role"):
            batch.drop_column(column)
    op.drop_table("clusters")
