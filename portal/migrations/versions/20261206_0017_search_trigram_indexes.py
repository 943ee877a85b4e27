"""trigram indexes for the study search's "contains" matches on patient ID, accession number
and the folded patient name (PostgreSQL: pg_trgm GIN; SQLite: plain indexes, as the models)

Revision ID: 20261206_0017
Revises: 20261206_0016
Create Date: 2026-12-06 15:00:00
"""
from alembic import op

revision = '20261206_0017'
down_revision = '20261206_0016'
branch_labels = None
depends_on = None

INDEXES = (('ix_patient_patient_id_trgm', 'patient', 'patient_id'),
           ('ix_patient_name_search_trgm', 'patient', 'name_search'),
           ('ix_study_accession_number_trgm', 'study', 'accession_number'))


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        # pg_trgm ships with PostgreSQL (Debian: the postgresql package) and is a trusted
        # extension since PostgreSQL 13: the database's owner may create it.
        op.execute('CREATE EXTENSION IF NOT EXISTS pg_trgm')
    for name, table, column in INDEXES:
        # fastupdate off: new rows are searchable through the index at once, never through
        # GIN's unsorted pending list (which every search would scan until autovacuum).
        op.create_index(name, table, [column], postgresql_using='gin',
                        postgresql_ops={column: 'gin_trgm_ops'},
                        postgresql_with={'fastupdate': 'off'})


def downgrade() -> None:
    # The extension stays: something else in the database may use it.
    for name, table, _column in INDEXES:
        op.drop_index(name, table_name=table)
