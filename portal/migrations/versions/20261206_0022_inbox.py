"""the upload inbox: upload links, their sessions, uploaded files, quarantined studies

Revision ID: 20261206_0022
Revises: 20261206_0021
Create Date: 2026-12-06 19:00:00
"""
from alembic import op
import sqlalchemy as sa

import portal.db

revision = '20261206_0022'
down_revision = '20261206_0021'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('inbox_upload_link',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('public_id', sa.String(length=36), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('practice_fk', sa.Integer(), nullable=False),
    sa.Column('for_whom', sa.String(length=200), nullable=False),
    sa.Column('created_by', sa.String(length=256), nullable=False),
    sa.Column('created_by_fk', sa.Integer(), nullable=True),
    sa.Column('created_at', portal.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', portal.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', portal.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('revoked_by', sa.String(length=256), nullable=False),
    sa.Column('pin_hash', sa.String(length=256), nullable=False),
    sa.Column('failed_attempts', sa.Integer(), nullable=False),
    sa.Column('locked_at', portal.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('use_count', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['created_by_fk'], ['portal_user.id'], name=op.f('fk_inbox_upload_link_created_by_fk_portal_user')),
    sa.ForeignKeyConstraint(['practice_fk'], ['practice.id'], name=op.f('fk_inbox_upload_link_practice_fk_practice')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_inbox_upload_link')),
    sa.UniqueConstraint('public_id', name=op.f('uq_inbox_upload_link_public_id')),
    sa.UniqueConstraint('token_sha256', name=op.f('uq_inbox_upload_link_token_sha256'))
    )
    op.create_index(op.f('ix_inbox_upload_link_created_by_fk'), 'inbox_upload_link', ['created_by_fk'], unique=False)
    op.create_index(op.f('ix_inbox_upload_link_expires_at'), 'inbox_upload_link', ['expires_at'], unique=False)
    op.create_index(op.f('ix_inbox_upload_link_practice_fk'), 'inbox_upload_link', ['practice_fk'], unique=False)
    op.create_table('inbox_file',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('public_id', sa.String(length=36), nullable=False),
    sa.Column('practice_fk', sa.Integer(), nullable=False),
    sa.Column('link_fk', sa.Integer(), nullable=True),
    sa.Column('uploaded_by', sa.String(length=256), nullable=False),
    sa.Column('name', sa.String(length=500), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('received', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('results', sa.JSON(), nullable=False),
    sa.Column('created_at', portal.db.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['link_fk'], ['inbox_upload_link.id'], name=op.f('fk_inbox_file_link_fk_inbox_upload_link')),
    sa.ForeignKeyConstraint(['practice_fk'], ['practice.id'], name=op.f('fk_inbox_file_practice_fk_practice')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_inbox_file')),
    sa.UniqueConstraint('public_id', name=op.f('uq_inbox_file_public_id'))
    )
    op.create_index(op.f('ix_inbox_file_link_fk'), 'inbox_file', ['link_fk'], unique=False)
    op.create_index(op.f('ix_inbox_file_practice_fk'), 'inbox_file', ['practice_fk'], unique=False)
    op.create_table('inbox_study',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('public_id', sa.String(length=36), nullable=False),
    sa.Column('practice_fk', sa.Integer(), nullable=False),
    sa.Column('link_fk', sa.Integer(), nullable=True),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_name', sa.String(length=324), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('issuer_of_patient_id', sa.String(length=64), nullable=False),
    sa.Column('patient_birth_date', sa.String(length=8), nullable=False),
    sa.Column('patient_sex', sa.String(length=16), nullable=False),
    sa.Column('accession_number', sa.String(length=64), nullable=False),
    sa.Column('study_date', sa.String(length=8), nullable=False),
    sa.Column('study_description', sa.String(length=200), nullable=False),
    sa.Column('modalities', sa.String(length=64), nullable=False),
    sa.Column('uploaded_by', sa.String(length=256), nullable=False),
    sa.Column('created_at', portal.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('decided_by', sa.String(length=256), nullable=False),
    sa.Column('decided_at', portal.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('local_patient_id', sa.String(length=64), nullable=False),
    sa.Column('local_accession_number', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['link_fk'], ['inbox_upload_link.id'], name=op.f('fk_inbox_study_link_fk_inbox_upload_link')),
    sa.ForeignKeyConstraint(['practice_fk'], ['practice.id'], name=op.f('fk_inbox_study_practice_fk_practice')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_inbox_study')),
    sa.UniqueConstraint('public_id', name=op.f('uq_inbox_study_public_id'))
    )
    op.create_index(op.f('ix_inbox_study_practice_fk'), 'inbox_study', ['practice_fk'], unique=False)
    op.create_index(op.f('ix_inbox_study_state'), 'inbox_study', ['state'], unique=False)
    op.create_index(op.f('ix_inbox_study_study_instance_uid'), 'inbox_study', ['study_instance_uid'], unique=False)
    op.create_table('inbox_upload_session',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('link_fk', sa.Integer(), nullable=False),
    sa.Column('created_at', portal.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', portal.db.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['link_fk'], ['inbox_upload_link.id'], name=op.f('fk_inbox_upload_session_link_fk_inbox_upload_link')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_inbox_upload_session')),
    sa.UniqueConstraint('token_sha256', name=op.f('uq_inbox_upload_session_token_sha256'))
    )
    op.create_index(op.f('ix_inbox_upload_session_link_fk'), 'inbox_upload_session', ['link_fk'], unique=False)
    op.create_table('inbox_instance',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_fk', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=500), nullable=False),
    sa.ForeignKeyConstraint(['study_fk'], ['inbox_study.id'], name=op.f('fk_inbox_instance_study_fk_inbox_study')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_inbox_instance')),
    sa.UniqueConstraint('study_fk', 'sop_instance_uid', name=op.f('uq_inbox_instance_study_fk'))
    )
    op.create_index(op.f('ix_inbox_instance_study_fk'), 'inbox_instance', ['study_fk'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_inbox_instance_study_fk'), table_name='inbox_instance')
    op.drop_table('inbox_instance')
    op.drop_index(op.f('ix_inbox_upload_session_link_fk'), table_name='inbox_upload_session')
    op.drop_table('inbox_upload_session')
    op.drop_index(op.f('ix_inbox_study_study_instance_uid'), table_name='inbox_study')
    op.drop_index(op.f('ix_inbox_study_state'), table_name='inbox_study')
    op.drop_index(op.f('ix_inbox_study_practice_fk'), table_name='inbox_study')
    op.drop_table('inbox_study')
    op.drop_index(op.f('ix_inbox_file_practice_fk'), table_name='inbox_file')
    op.drop_index(op.f('ix_inbox_file_link_fk'), table_name='inbox_file')
    op.drop_table('inbox_file')
    op.drop_index(op.f('ix_inbox_upload_link_practice_fk'), table_name='inbox_upload_link')
    op.drop_index(op.f('ix_inbox_upload_link_expires_at'), table_name='inbox_upload_link')
    op.drop_index(op.f('ix_inbox_upload_link_created_by_fk'), table_name='inbox_upload_link')
    op.drop_table('inbox_upload_link')
