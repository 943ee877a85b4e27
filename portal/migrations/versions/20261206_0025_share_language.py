"""a share link keeps the language its messages and pages are in (issue 21 item 3)

Revision ID: 20261206_0025
Revises: 20261206_0024
Create Date: 2026-12-06 22:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '20261206_0025'
down_revision = '20261206_0024'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('share_link', schema=None) as batch_op:
        batch_op.add_column(sa.Column('language', sa.String(length=16), nullable=False,
                                      server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('share_link', schema=None) as batch_op:
        batch_op.drop_column('language')
