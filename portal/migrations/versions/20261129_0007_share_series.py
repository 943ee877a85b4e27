"""share links to selected series: the series each linked study opens

Revision ID: 20261129_0007
Revises: 20261129_0006
Create Date: 2026-11-29 05:15:00
"""
from alembic import op
import sqlalchemy as sa

revision = '20261129_0007'
down_revision = '20261129_0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('share_link_study', schema=None) as batch_op:
        # Existing links open whole studies: an empty list.
        batch_op.add_column(sa.Column('series_uids', sa.JSON(), nullable=False,
                                      server_default=sa.text("'[]'")))


def downgrade() -> None:
    with op.batch_alter_table('share_link_study', schema=None) as batch_op:
        batch_op.drop_column('series_uids')
