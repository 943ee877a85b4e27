"""the study's (date, time) kept beside its access keys (``study_referrer``, ``order_study``),
indexed as (key, date, time, study_fk): a person's list pages come off these indexes in the
list's order, key by key, instead of sorting every study he may see; the (key, study_fk)
indexes give way to them (they answer the same lookups by key)

Revision ID: 20261206_0028
Revises: 20261206_0027
Create Date: 2026-12-06 23:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '20261206_0028'
down_revision = '20261206_0027'
branch_labels = None
depends_on = None

TABLES = ('study_referrer', 'order_study')
FILL = {
    'study_referrer': "UPDATE study_referrer SET study_date = study.study_date, "
                      "study_time = study.study_time FROM study "
                      "WHERE study.id = study_referrer.study_fk",
    'order_study': "UPDATE order_study SET study_date = study.study_date, "
                   "study_time = study.study_time FROM study "
                   "WHERE study.id = order_study.study_fk",
}


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('study_date', sa.String(length=8), nullable=False,
                                          server_default=sa.text("''")))
            batch_op.add_column(sa.Column('study_time', sa.String(length=16), nullable=False,
                                          server_default=sa.text("''")))
        # Every key already kept: its study's date and time (one joined UPDATE per table;
        # SQLite has UPDATE ... FROM since 3.33).
        op.execute(FILL[table])
        op.drop_index(f'ix_{table}_key_study_fk', table_name=table)
        op.create_index(f'ix_{table}_key_date', table,
                        ['key', 'study_date', 'study_time', 'study_fk'])


def downgrade() -> None:
    for table in TABLES:
        op.create_index(f'ix_{table}_key_study_fk', table, ['key', 'study_fk'])
        op.drop_index(f'ix_{table}_key_date', table_name=table)
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('study_time')
            batch_op.drop_column('study_date')
