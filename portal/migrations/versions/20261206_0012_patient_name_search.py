"""a folded copy of each patient's name for searching (case, accents and word order ignored)

Revision ID: 20261206_0012
Revises: 20261206_0010
Create Date: 2026-12-06 10:00:00
"""
from alembic import op
import sqlalchemy as sa

from portal.index.names import name_search_text

revision = '20261206_0012'
down_revision = '20261206_0010'
branch_labels = None
depends_on = None

BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name_search', sa.String(length=512), nullable=False,
                                      server_default=sa.text("''")))
    # Patients indexed before this revision: fill their search text from the stored name.
    connection = op.get_bind()
    patient = sa.table('patient', sa.column('id', sa.Integer),
                       sa.column('patient_name', sa.String),
                       sa.column('name_search', sa.String))
    last = 0
    while True:
        rows = connection.execute(
            sa.select(patient.c.id, patient.c.patient_name).where(patient.c.id > last)
            .order_by(patient.c.id).limit(BATCH)).all()
        if not rows:
            break
        for row_id, name in rows:
            text = name_search_text(name)
            if text:
                connection.execute(patient.update().where(patient.c.id == row_id)
                                   .values(name_search=text))
        last = rows[-1][0]


def downgrade() -> None:
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.drop_column('name_search')
