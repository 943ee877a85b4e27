"""The JSON API for the portal's own actions, described by /api/openapi.json."""
