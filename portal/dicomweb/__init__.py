"""dicomweb package."""
