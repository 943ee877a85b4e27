"""reports, report versions, orders and appointments, patient release rules

Revision ID: 20261129_0003
Revises: 20261129_0002
Create Date: 2026-11-29 04:40:00
"""
from alembic import op
import sqlalchemy as sa

import portal.db

revision = '20261129_0003'
down_revision = '20261129_0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('imaging_order',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('placer_order_number', sa.String(length=64), nullable=False),
    sa.Column('filler_order_number', sa.String(length=64), nullable=False),
    sa.Column('accession_number', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('patient_name', sa.String(length=324), nullable=False),
    sa.Column('procedure', sa.String(length=128), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=False),
    sa.Column('ordering_provider', sa.String(length=324), nullable=False),
    sa.Column('ordering_provider_key', sa.String(length=128), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('scheduled_at', portal.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('location', sa.String(length=128), nullable=False),
    sa.Column('updated_at', portal.db.UTCDateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_imaging_order'))
    )
    op.create_index(op.f('ix_imaging_order_accession_number'), 'imaging_order', ['accession_number'], unique=False)
    op.create_index(op.f('ix_imaging_order_filler_order_number'), 'imaging_order', ['filler_order_number'], unique=False)
    op.create_index(op.f('ix_imaging_order_ordering_provider_key'), 'imaging_order', ['ordering_provider_key'], unique=False)
    op.create_index(op.f('ix_imaging_order_patient_id'), 'imaging_order', ['patient_id'], unique=False)
    op.create_index(op.f('ix_imaging_order_study_instance_uid'), 'imaging_order', ['study_instance_uid'], unique=False)
    op.create_table('report',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=8), nullable=False),
    sa.Column('source_id', sa.String(length=128), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('accession_number', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('title', sa.String(length=128), nullable=False),
    sa.Column('findings', sa.Text(), nullable=False),
    sa.Column('impression', sa.Text(), nullable=False),
    sa.Column('author', sa.String(length=324), nullable=False),
    sa.Column('signed_at', portal.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('final_at', portal.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('pdf', sa.LargeBinary(), nullable=True),
    sa.Column('notified_at', portal.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('received_at', portal.db.UTCDateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', portal.db.UTCDateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_report')),
    sa.UniqueConstraint('source', 'source_id', name=op.f('uq_report_source'))
    )
    op.create_index(op.f('ix_report_accession_number'), 'report', ['accession_number'], unique=False)
    op.create_index(op.f('ix_report_study_instance_uid'), 'report', ['study_instance_uid'], unique=False)
    op.create_table('report_release_rule',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('practice_fk', sa.Integer(), nullable=True),
    sa.Column('modality', sa.String(length=16), nullable=False),
    sa.Column('delay_hours', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['practice_fk'], ['practice.id'], name=op.f('fk_report_release_rule_practice_fk_practice')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_report_release_rule')),
    sa.UniqueConstraint('practice_fk', 'modality', name=op.f('uq_report_release_rule_practice_fk'))
    )
    op.create_table('report_version',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('report_fk', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('findings', sa.Text(), nullable=False),
    sa.Column('impression', sa.Text(), nullable=False),
    sa.Column('author', sa.String(length=324), nullable=False),
    sa.Column('signed_at', portal.db.UTCDateTime(timezone=True), nullable=True),
    sa.Column('received_at', portal.db.UTCDateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['report_fk'], ['report.id'], name=op.f('fk_report_version_report_fk_report')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_report_version')),
    sa.UniqueConstraint('report_fk', 'version', name=op.f('uq_report_version_report_fk'))
    )
    op.create_index(op.f('ix_report_version_report_fk'), 'report_version', ['report_fk'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_report_version_report_fk'), table_name='report_version')
    op.drop_table('report_version')
    op.drop_table('report_release_rule')
    op.drop_index(op.f('ix_report_study_instance_uid'), table_name='report')
    op.drop_index(op.f('ix_report_accession_number'), table_name='report')
    op.drop_table('report')
    op.drop_index(op.f('ix_imaging_order_study_instance_uid'), table_name='imaging_order')
    op.drop_index(op.f('ix_imaging_order_patient_id'), table_name='imaging_order')
    op.drop_index(op.f('ix_imaging_order_ordering_provider_key'), table_name='imaging_order')
    op.drop_index(op.f('ix_imaging_order_filler_order_number'), table_name='imaging_order')
    op.drop_index(op.f('ix_imaging_order_accession_number'), table_name='imaging_order')
    op.drop_table('imaging_order')
