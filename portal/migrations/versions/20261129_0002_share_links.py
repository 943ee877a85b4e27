"""share links: links, the studies each opens, and share sessions

Revision ID: 20261129_0002
Revises: 20261128_0001
Create Date: 2026-11-29 04:07:18.249941
"""
from alembic import op
import sqlalchemy as sa

import portal.db

revision = '20261129_0002'
down_revision = '20261128_0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('share_link',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('public_id', sa.String(length=36), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('audience', sa.String(length=16), nullable=False),
    sa.Column('requires_sign_in', sa.Boolean(), nullable=False),
    sa.Column('can_download', sa.Boolean(), nullable=False),
    sa.Column('note', sa.String(length=500), nullable=False),
    sa.Column('patient_fk', sa.Integer(), nullable=True),
    sa.Column('created_by', sa.String(length=256), nullable=False),
    sa.Column('created_by_fk', sa.Integer(), nullable=True),
    sa.Column('created_at', portal.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('not_before', portal.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', portal.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', portal.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('revoked_by', sa.String(length=256), nullable=False),
    sa.Column('pin_hash', sa.String(length=256), nullable=False),
    sa.Column('failed_attempts', sa.Integer(), nullable=False),
    sa.Column('locked_at', portal.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('use_count', sa.Integer(), nullable=False),
    sa.Column('first_used_at', portal.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', portal.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('notify_sender', sa.Boolean(), nullable=False),
    sa.Column('deliveries', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['created_by_fk'], ['portal_user.id'], name=op.f('fk_share_link_created_by_fk_portal_user')),
    sa.ForeignKeyConstraint(['patient_fk'], ['patient.id'], name=op.f('fk_share_link_patient_fk_patient')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_share_link')),
    sa.UniqueConstraint('public_id', name=op.f('uq_share_link_public_id')),
    sa.UniqueConstraint('token_sha256', name=op.f('uq_share_link_token_sha256'))
    )
    with op.batch_alter_table('share_link', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_share_link_created_by_fk'), ['created_by_fk'], unique=False)
        batch_op.create_index(batch_op.f('ix_share_link_expires_at'), ['expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_share_link_patient_fk'), ['patient_fk'], unique=False)

    op.create_table('share_link_study',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('share_fk', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['share_fk'], ['share_link.id'], name=op.f('fk_share_link_study_share_fk_share_link')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_share_link_study')),
    sa.UniqueConstraint('share_fk', 'study_instance_uid', name=op.f('uq_share_link_study_share_fk'))
    )
    with op.batch_alter_table('share_link_study', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_share_link_study_share_fk'), ['share_fk'], unique=False)
        batch_op.create_index(batch_op.f('ix_share_link_study_study_instance_uid'), ['study_instance_uid'], unique=False)

    op.create_table('share_session',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('share_fk', sa.Integer(), nullable=False),
    sa.Column('purpose', sa.String(length=8), nullable=False),
    sa.Column('created_at', portal.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', portal.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', portal.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('source_address', sa.String(length=64), nullable=False),
    sa.Column('device_class', sa.String(length=16), nullable=False),
    sa.ForeignKeyConstraint(['share_fk'], ['share_link.id'], name=op.f('fk_share_session_share_fk_share_link')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_share_session')),
    sa.UniqueConstraint('token_sha256', name=op.f('uq_share_session_token_sha256'))
    )
    with op.batch_alter_table('share_session', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_share_session_share_fk'), ['share_fk'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('share_session', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_share_session_share_fk'))

    op.drop_table('share_session')
    with op.batch_alter_table('share_link_study', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_share_link_study_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_share_link_study_share_fk'))

    op.drop_table('share_link_study')
    with op.batch_alter_table('share_link', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_share_link_patient_fk'))
        batch_op.drop_index(batch_op.f('ix_share_link_expires_at'))
        batch_op.drop_index(batch_op.f('ix_share_link_created_by_fk'))

    op.drop_table('share_link')
