"""indexes for the index at a million studies: the folded patient name that QIDO's exact and
prefix name matches compare (PostgreSQL expression index), the study list's order, and a
physician's studies by his referrer keys (key, study_fk)

Revision ID: 20261206_0018
Revises: 20261206_0017
Create Date: 2026-12-06 16:00:00
"""
from alembic import op

revision = '20261206_0018'
down_revision = '20261206_0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Newest first, as every study list and QIDO answer is ordered: a page is read from the
    # index's end instead of sorting every visible study.
    op.create_index('ix_study_date_time_id', 'study', ['study_date', 'study_time', 'id'])
    # A physician's studies by his referrer keys, from the index alone.
    op.create_index('ix_study_referrer_key_study_fk', 'study_referrer', ['key', 'study_fk'])
    op.drop_index('ix_study_referrer_key', table_name='study_referrer')
    if op.get_bind().dialect.name == 'postgresql':
        # rtrim(lower(name), '^= ') is what a PN match compares (PS3.5 6.2: trailing empty
        # components do not count); text_pattern_ops serves both = and LIKE 'prefix%'.
        op.execute("CREATE INDEX ix_patient_name_folded ON patient "
                   "(rtrim(lower(patient_name), '^= ') text_pattern_ops)")


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.drop_index('ix_patient_name_folded', table_name='patient')
    op.create_index('ix_study_referrer_key', 'study_referrer', ['key'])
    op.drop_index('ix_study_referrer_key_study_fk', table_name='study_referrer')
    op.drop_index('ix_study_date_time_id', table_name='study')
