"""who saved which measurements: the viewer shows them to their author and his links' visitors (issue 20 item 4)

Revision ID: 20261206_0026
Revises: 20261206_0025
Create Date: 2026-12-06 22:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '20261206_0026'
down_revision = '20261206_0025'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('saved_measurements',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('instance_fk', sa.Integer(), nullable=False),
    sa.Column('author_fk', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['author_fk'], ['portal_user.id'], name=op.f('fk_saved_measurements_author_fk_portal_user'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['instance_fk'], ['instance.id'], name=op.f('fk_saved_measurements_instance_fk_instance'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_saved_measurements')),
    sa.UniqueConstraint('instance_fk', name=op.f('uq_saved_measurements_instance_fk'))
    )
    op.create_index(op.f('ix_saved_measurements_author_fk'), 'saved_measurements', ['author_fk'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_saved_measurements_author_fk'), table_name='saved_measurements')
    op.drop_table('saved_measurements')
