"""FleetLock: reboot slots held per group, and each group's number of slots.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from basalt.fleet.db import UTCDateTime

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reboot_slots",
        sa.Column("group_name", sa.String(63), primary_key=True),
        sa.Column("holder", sa.String(253), primary_key=True),
        sa.Column("since", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "reboot_groups",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("slots", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("reboot_groups")
    op.drop_table("reboot_slots")
