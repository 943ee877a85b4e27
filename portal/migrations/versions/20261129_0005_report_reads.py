"""report reads: which version of a report each person has seen

Revision ID: 20261129_0005
Revises: 20261129_0004
Create Date: 2026-11-29 04:45:00
"""
from alembic import op
import sqlalchemy as sa

import portal.db

revision = '20261129_0005'
down_revision = '20261129_0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('report_read',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_fk', sa.Integer(), nullable=False),
    sa.Column('report_fk', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('read_at', portal.db.UTCDateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['report_fk'], ['report.id'], name=op.f('fk_report_read_report_fk_report')),
    sa.ForeignKeyConstraint(['user_fk'], ['portal_user.id'], name=op.f('fk_report_read_user_fk_portal_user')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_report_read')),
    sa.UniqueConstraint('user_fk', 'report_fk', name=op.f('uq_report_read_user_fk'))
    )
    op.create_index(op.f('ix_report_read_report_fk'), 'report_read', ['report_fk'], unique=False)
    op.create_index(op.f('ix_report_read_user_fk'), 'report_read', ['user_fk'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_report_read_user_fk'), table_name='report_read')
    op.drop_index(op.f('ix_report_read_report_fk'), table_name='report_read')
    op.drop_table('report_read')
