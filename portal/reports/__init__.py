"""Radiology reports, orders and appointments from the RIS."""
