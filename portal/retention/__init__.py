"""Retention: rules per practice and modality, legal holds, the list of studies due for
deletion, the office manager's approval, and the deletion itself (docs/architecture.md,
"The rooms"; docs/operations.md, "Retention")."""
