"""The office-manager console."""
