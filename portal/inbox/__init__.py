"""The upload inbox: outside images (a patient's CD, a ZIP) wait in quarantine until an
office manager reconciles them with a local patient (IHE Import Reconciliation Workflow) or
rejects them. See docs/inbox.md."""
