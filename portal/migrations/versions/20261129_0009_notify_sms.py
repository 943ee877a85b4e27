"""a mobile number per person and the choice of report-ready notices by text message

Revision ID: 20261129_0009
Revises: 20261129_0008
Create Date: 2026-11-29 11:40:00
"""
from alembic import op
import sqlalchemy as sa

revision = '20261129_0009'
down_revision = '20261129_0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('portal_user', schema=None) as batch_op:
        # Existing people: no number yet, and notices by e-mail only until someone chooses.
        batch_op.add_column(sa.Column('phone_number', sa.String(length=32), nullable=False,
                                      server_default=sa.text("''")))
        batch_op.add_column(sa.Column('notify_by_sms', sa.Boolean(), nullable=False,
                                      server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('portal_user', schema=None) as batch_op:
        batch_op.drop_column('notify_by_sms')
        batch_op.drop_column('phone_number')
