"""audit trail sealed off the request path: each record's place in the chain (``seq``, set by
the one sealer, NULL until then) and the forwarding mark as a chain position

Revision ID: 20261206_0019
Revises: 20261206_0018
Create Date: 2026-12-06 17:00:00
"""
from alembic import op
import sqlalchemy as sa

revision = '20261206_0019'
down_revision = '20261206_0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('seq', sa.Integer(), nullable=True))
    # Until now every record was chained when it was written, in id order: its place in the
    # chain is its rank by id (ids of rolled-back writes left gaps).
    op.execute("UPDATE audit_event SET seq = ranked.n FROM (SELECT id, row_number() OVER "
               "(ORDER BY id) AS n FROM audit_event) AS ranked "
               "WHERE audit_event.id = ranked.id")
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_event_seq'), ['seq'], unique=True)
    with op.batch_alter_table('audit_forward', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_seq', sa.Integer(), server_default='0',
                                      nullable=False))
    op.execute("UPDATE audit_forward SET last_seq = (SELECT count(*) FROM audit_event "
               "WHERE audit_event.id <= audit_forward.last_id)")


def downgrade() -> None:
    with op.batch_alter_table('audit_forward', schema=None) as batch_op:
        batch_op.drop_column('last_seq')
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_event_seq'))
        batch_op.drop_column('seq')
