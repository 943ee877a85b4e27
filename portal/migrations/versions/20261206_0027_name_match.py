"""patient names in other character sets: each component group folded for PN matching
(patient.name_match, QIDO-RS and C-FIND match any group), the search words again (katakana
as hiragana, kana voicing kept, Hangul composed, a Japanese, Korean or Chinese name also as one
word); the expression index of the lower-cased name gives way to a trigram index on name_match

Revision ID: 20261206_0027
Revises: 20261206_0026
Create Date: 2026-12-06 22:30:00
"""
from alembic import op
import sqlalchemy as sa

from portal.index.names import name_match_text, name_search_text

revision = '20261206_0027'
down_revision = '20261206_0026'
branch_labels = None
depends_on = None

BATCH = 1000


def upgrade() -> None:
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name_match', sa.String(length=512), nullable=False,
                                      server_default=sa.text("''")))
    # Every patient indexed before: both keys from the stored (decoded) name.
    connection = op.get_bind()
    patient = sa.table('patient', sa.column('id', sa.Integer),
                       sa.column('patient_name', sa.String),
                       sa.column('name_search', sa.String),
                       sa.column('name_match', sa.String))
    last = 0
    while True:
        rows = connection.execute(
            sa.select(patient.c.id, patient.c.patient_name, patient.c.name_search)
            .where(patient.c.id > last).order_by(patient.c.id).limit(BATCH)).all()
        if not rows:
            break
        for row_id, name, search in rows:
            match, words = name_match_text(name), name_search_text(name)
            if match or words != search:
                connection.execute(patient.update().where(patient.c.id == row_id)
                                   .values(name_match=match, name_search=words))
        last = rows[-1][0]
    if connection.dialect.name == 'postgresql':
        op.drop_index('ix_patient_name_folded', table_name='patient')
    op.create_index('ix_patient_name_match_trgm', 'patient', ['name_match'],
                    postgresql_using='gin', postgresql_ops={'name_match': 'gin_trgm_ops'},
                    postgresql_with={'fastupdate': 'off'})


def downgrade() -> None:
    op.drop_index('ix_patient_name_match_trgm', table_name='patient')
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("CREATE INDEX ix_patient_name_folded ON patient "
                   "(rtrim(lower(patient_name), '^= ') text_pattern_ops)")
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.drop_column('name_match')
