"""a report's clinically relevant time as its sender gives it (HL7 OBR-7, FHIR
effectiveDateTime or effectivePeriod.start): FHIR's effectiveDateTime no longer stands in
with the signing time when the sender named the time of the examination

Revision ID: 20261207_0031
Revises: 20261207_0030
Create Date: 2026-12-08 00:00:00
"""
from alembic import op
import sqlalchemy as sa

import portal.db

revision = '20261207_0031'
down_revision = '20261207_0030'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('report', 'report_version'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('clinical_at', portal.db.UTCDateTime(timezone=True),
                                          nullable=True))


def downgrade() -> None:
    for table in ('report_version', 'report'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('clinical_at')
