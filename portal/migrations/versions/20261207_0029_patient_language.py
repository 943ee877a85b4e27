"""the patient's language as the RIS gives it (HL7 PID-15) on reports and orders

Revision ID: 20261207_0029
Revises: 20261206_0028
Create Date: 2026-12-07 14:15:00
"""
from alembic import op
import sqlalchemy as sa

revision = '20261207_0029'
down_revision = '20261206_0028'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('report', 'imaging_order'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('patient_language', sa.String(length=16),
                                          nullable=False, server_default=''))


def downgrade() -> None:
    for table in ('report', 'imaging_order'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('patient_language')
