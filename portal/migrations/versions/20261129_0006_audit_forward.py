"""audit forwarding mark: how far the trail was sent to the audit repository

Revision ID: 20261129_0006
Revises: 20261129_0005
Create Date: 2026-11-29 05:10:00
"""
from alembic import op
import sqlalchemy as sa

import portal.db

revision = '20261129_0006'
down_revision = '20261129_0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_forward',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('last_id', sa.Integer(), nullable=False),
    sa.Column('forwarded_at', portal.db.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_forward'))
    )


def downgrade() -> None:
    op.drop_table('audit_forward')
