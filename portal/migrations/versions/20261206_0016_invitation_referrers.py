"""an invitation can carry referrer identifiers, linked to whoever redeems it

Revision ID: 20261206_0016
Revises: 20261206_0015
Create Date: 2026-12-06 14:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '20261206_0016'
down_revision = '20261206_0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('invitation', schema=None) as batch_op:
        batch_op.add_column(sa.Column('referrer_keys', sa.JSON(), nullable=False,
                                      server_default=sa.text("'[]'")))


def downgrade() -> None:
    with op.batch_alter_table('invitation', schema=None) as batch_op:
        batch_op.drop_column('referrer_keys')
