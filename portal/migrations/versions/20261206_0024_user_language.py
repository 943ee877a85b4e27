"""a person's chosen language, kept with his account (issue 21, portal/i18n.py)

Revision ID: 20261206_0024
Revises: 20261206_0023
Create Date: 2026-12-06 19:30:00
"""
from alembic import op
import sqlalchemy as sa

revision = '20261206_0024'
down_revision = '20261206_0023'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('portal_user', schema=None) as batch_op:
        batch_op.add_column(sa.Column('language', sa.String(length=16), nullable=False,
                                      server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('portal_user', schema=None) as batch_op:
        batch_op.drop_column('language')
