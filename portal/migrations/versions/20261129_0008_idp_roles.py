"""roles the identity provider asserted, so it can take them away again

Revision ID: 20261129_0008
Revises: 20261129_0007
Create Date: 2026-11-29 09:20:00
"""
from alembic import op
import sqlalchemy as sa

revision = '20261129_0008'
down_revision = '20261129_0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('portal_user', schema=None) as batch_op:
        # Users from before this revision: their roles count as given in the portal until
        # the provider asserts them at a next sign-in.
        batch_op.add_column(sa.Column('idp_roles', sa.JSON(), nullable=False,
                                      server_default=sa.text("'[]'")))


def downgrade() -> None:
    with op.batch_alter_table('portal_user', schema=None) as batch_op:
        batch_op.drop_column('idp_roles')
