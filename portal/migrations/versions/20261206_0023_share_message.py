"""a share link carries a note for the person it is made for (issue 20 item 5)

Revision ID: 20261206_0023
Revises: 20261206_0022
Create Date: 2026-12-06 19:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '20261206_0023'
down_revision = '20261206_0022'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('share_link', schema=None) as batch_op:
        batch_op.add_column(sa.Column('message', sa.String(length=1000), nullable=False,
                                      server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('share_link', schema=None) as batch_op:
        batch_op.drop_column('message')
