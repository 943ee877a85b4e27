"""retention: rules per practice and modality, legal holds per patient, and the list of
studies due for deletion with their approval

Revision ID: 20261206_0021
Revises: 20261206_0020
Create Date: 2026-12-06 19:00:00
"""
from alembic import op
import sqlalchemy as sa

from portal.db import UTCDateTime

revision = '20261206_0021'
down_revision = '20261206_0020'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'retention_rule',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('practice_fk', sa.Integer(), nullable=False),
        sa.Column('modality', sa.String(length=16), nullable=False),
        sa.Column('keep_years', sa.Integer(), nullable=False),
        sa.Column('basis', sa.String(length=16), nullable=False),
        sa.Column('minors_until_age', sa.Integer(), nullable=True),
        sa.Column('changed_by', sa.String(length=256), nullable=False),
        sa.Column('changed_at', UTCDateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'),
                  nullable=False),
        sa.ForeignKeyConstraint(['practice_fk'], ['practice.id']),
        sa.PrimaryKeyConstraint('id'))
    op.create_index(op.f('ix_retention_rule_practice_fk'), 'retention_rule', ['practice_fk'])
    op.create_table(
        'legal_hold',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('patient_fk', sa.Integer(), nullable=False),
        sa.Column('reason', sa.String(length=500), nullable=False),
        sa.Column('placed_by', sa.String(length=256), nullable=False),
        sa.Column('placed_at', UTCDateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'),
                  nullable=False),
        sa.Column('released_by', sa.String(length=256), nullable=False),
        sa.Column('released_at', UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['patient_fk'], ['patient.id']),
        sa.PrimaryKeyConstraint('id'))
    op.create_index(op.f('ix_legal_hold_patient_fk'), 'legal_hold', ['patient_fk'])
    op.create_table(
        'retention_due',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('kept_until', sa.String(length=8), nullable=False),
        sa.Column('listed_at', UTCDateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'),
                  nullable=False),
        sa.Column('approved_by', sa.String(length=256), nullable=False),
        sa.Column('approved_at', UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('study_instance_uid'))


def downgrade() -> None:
    op.drop_table('retention_due')
    op.drop_index(op.f('ix_legal_hold_patient_fk'), table_name='legal_hold')
    op.drop_table('legal_hold')
    op.drop_index(op.f('ix_retention_rule_practice_fk'), table_name='retention_rule')
    op.drop_table('retention_rule')
