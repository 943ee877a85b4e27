"""report versions keep when the sender made them and the HL7 message that brought them; HL7
messages already stored are remembered, so a retransmission is not applied twice

Revision ID: 20261206_0015
Revises: 20261206_0012
Create Date: 2026-12-06 12:00:00
"""
from alembic import op
import sqlalchemy as sa

import portal.db

revision = '20261206_0015'
down_revision = '20261206_0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('report', schema=None) as batch_op:
        batch_op.add_column(sa.Column('observed_at', portal.db.UTCDateTime(timezone=True),
                                      nullable=True))
    with op.batch_alter_table('report_version', schema=None) as batch_op:
        batch_op.add_column(sa.Column('observed_at', portal.db.UTCDateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column('message_id', sa.String(length=64), nullable=False,
                                      server_default=sa.text("''")))
    op.create_table(
        'hl7_received_message',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('sender', sa.String(length=64), nullable=False),
        sa.Column('control_id', sa.String(length=64), nullable=False),
        sa.Column('digest', sa.String(length=64), nullable=False),
        sa.Column('received_at', portal.db.UTCDateTime(timezone=True),
                  server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_hl7_received_message')),
        sa.UniqueConstraint('sender', 'control_id', 'digest',
                            name=op.f('uq_hl7_received_message_sender')),
    )


def downgrade() -> None:
    op.drop_table('hl7_received_message')
    with op.batch_alter_table('report_version', schema=None) as batch_op:
        batch_op.drop_column('message_id')
        batch_op.drop_column('observed_at')
    with op.batch_alter_table('report', schema=None) as batch_op:
        batch_op.drop_column('observed_at')
