"""a grant of every study of a patient keeps the practice whose manager gave it: it covers
that practice's studies of the patient, not the ones other practices hold (docs/security.md
11); grants of the command line, of the installation's manager and emergency access keep
none and cover every study of the patient, as before

Revision ID: 20261208_0032
Revises: 20261207_0031
Create Date: 2026-12-08 00:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '20261208_0032'
down_revision = '20261207_0031'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('access_grant', schema=None) as batch_op:
        batch_op.add_column(sa.Column('practice_fk', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_access_grant_practice_fk_practice'),
                                    'practice', ['practice_fk'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('access_grant', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_access_grant_practice_fk_practice'),
                                 type_='foreignkey')
        batch_op.drop_column('practice_fk')
