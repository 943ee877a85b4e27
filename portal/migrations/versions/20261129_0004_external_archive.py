"""external archive: instances known from a DICOMweb PACS, cached copies, sync progress

Revision ID: 20261129_0004
Revises: 20261129_0003
Create Date: 2026-11-29 12:00:00.000000
"""
from alembic import op
import sqlalchemy as sa

import portal.db

revision = '20261129_0004'
down_revision = '20261129_0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('external_instance',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('synced_at', portal.db.UTCDateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_external_instance')),
    sa.UniqueConstraint('sop_instance_uid', name=op.f('uq_external_instance_sop_instance_uid'))
    )
    with op.batch_alter_table('external_instance', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_external_instance_study_instance_uid'), ['study_instance_uid'], unique=False)

    op.create_table('cached_copy',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('fetched_at', portal.db.UTCDateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('last_used_at', portal.db.UTCDateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cached_copy')),
    sa.UniqueConstraint('sop_instance_uid', name=op.f('uq_cached_copy_sop_instance_uid'))
    )
    with op.batch_alter_table('cached_copy', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_cached_copy_last_used_at'), ['last_used_at'], unique=False)

    op.create_table('archive_sync_state',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=256), nullable=False),
    sa.Column('run_since', sa.String(length=8), nullable=False),
    sa.Column('next_offset', sa.Integer(), nullable=True),
    sa.Column('run_started_at', portal.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('completed_at', portal.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('studies_synced', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.String(length=256), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_archive_sync_state')),
    sa.UniqueConstraint('source', name=op.f('uq_archive_sync_state_source'))
    )


def downgrade() -> None:
    op.drop_table('archive_sync_state')
    with op.batch_alter_table('cached_copy', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cached_copy_last_used_at'))
    op.drop_table('cached_copy')
    with op.batch_alter_table('external_instance', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_external_instance_study_instance_uid'))
    op.drop_table('external_instance')
