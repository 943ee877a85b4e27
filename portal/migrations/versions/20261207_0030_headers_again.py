"""kept instance headers made again: one odd value inside a sequence dropped the sequence

Revision ID: 20261207_0030
Revises: 20261207_0029
Create Date: 2026-12-07 21:00:00
"""
from alembic import op

revision = '20261207_0030'
down_revision = '20261207_0029'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The header is a cache of the file (Archive.header makes it again on first use); those
    # made before this revision may lack a sequence (index/service.py, header_json).
    op.execute('UPDATE instance SET header = NULL WHERE header IS NOT NULL')


def downgrade() -> None:
    pass  # a cache: nothing to put back
