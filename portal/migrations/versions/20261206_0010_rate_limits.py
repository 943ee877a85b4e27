"""rate-limit counts in the database, shared by every worker when there is no Redis

Revision ID: 20261206_0010
Revises: 20261129_0009
Create Date: 2026-12-06 09:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '20261206_0010'
down_revision = '20261129_0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'rate_limit_count',
        sa.Column('key', sa.String(length=200), nullable=False),
        sa.Column('window_start', sa.BigInteger(), nullable=False),
        sa.Column('hits', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('key', 'window_start', name=op.f('pk_rate_limit_count')),
    )
    with op.batch_alter_table('rate_limit_count', schema=None) as batch_op:
        # Old windows are swept by their start.
        batch_op.create_index(batch_op.f('ix_rate_limit_count_window_start'), ['window_start'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('rate_limit_count', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rate_limit_count_window_start'))
    op.drop_table('rate_limit_count')
