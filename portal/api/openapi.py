"""The OpenAPI 3.1 document served at /api/openapi.json."""

from __future__ import annotations

from typing import Any

_ERROR = {"description": "Refused, with a reason",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_AUTH = {"401": {"description": "Not signed in"},
         "403": {"description": "Not an office manager, or a cross-site request"}}


def _op(summary: str, responses: dict[str, Any], body: str | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {**responses, **_AUTH},
                                 "security": [{"bearer": []}, {"session": []}]}
    if body:
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body}"}}}}
    return operation


def _list_of(schema: str) -> dict[str, Any]:
    return {"description": "OK", "content": {"application/json": {"schema": {
        "type": "array", "items": {"$ref": f"#/components/schemas/{schema}"}}}}}


def _one(schema: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {
        "$ref": f"#/components/schemas/{schema}"}}}}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Referrer portal API", "version": "1",
             "description": "Office-manager actions: people, referrer identifiers, grants, "
                            "audit trail. DICOMweb lives under /dicomweb (PS3.18)."},
    "paths": {
        "/api/users": {"get": _op("List people", {"200": _list_of("User")})},
        "/api/users/{id}": {"patch": {**_op("Change roles, practice or activation",
                                            {"200": _one("User"), "400": _ERROR}, "UserPatch"),
                                      "parameters": [{"name": "id", "in": "path",
                                                      "required": True,
                                                      "schema": {"type": "integer"}}]}},
        "/api/invitations": {"post": _op("Make a one-time invitation link",
                                         {"201": {"description": "The link, shown once"},
                                          "400": _ERROR}, "InvitationNew")},
        "/api/identifiers": {
            "get": _op("Linked identifiers and suggestions", {"200": {"description": "OK"}}),
            "post": _op("Link a physician to an identifier",
                        {"201": _one("Identifier", "Linked"), "400": _ERROR}, "IdentifierNew")},
        "/api/identifiers/{id}": {"delete": {**_op("Unlink", {"204": {"description": "Done"},
                                                              "400": _ERROR}),
                                             "parameters": [{"name": "id", "in": "path",
                                                             "required": True,
                                                             "schema": {"type": "integer"}}]}},
        "/api/grants": {"get": _op("List grants", {"200": _list_of("Grant")}),
                        "post": _op("Grant access (or emergency access)",
                                    {"201": _one("Grant", "Granted"), "400": _ERROR},
                                    "GrantNew")},
        "/api/grants/revoke": {"post": _op("Revoke grants, all or nothing",
                                           {"200": {"description": "Revoked"},
                                            "400": _ERROR}, "RevokeRequest")},
        "/api/audit": {"get": {**_op("Read the audit trail", {"200": {"description": "OK"}}),
                               "parameters": [{"name": n, "in": "query", "schema": {
                                   "type": "integer" if n in ("limit", "offset")
                                   else "string"}} for n in ("who", "study", "event",
                                                             "limit", "offset")]}},
    },
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "An access token from the portal's OIDC issuer"},
            "session": {"type": "apiKey", "in": "cookie", "name": "__Host-portal",
                        "description": "Browser session; send X-CSRF-Token on changes"}},
        "schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "string"},
                                                       "status": {"type": "integer"}}},
            "User": {"type": "object", "properties": {
                "id": {"type": "integer"}, "issuer": {"type": "string"},
                "subject": {"type": "string"}, "email": {"type": "string"},
                "name": {"type": "string"}, "roles": {"type": "array", "items": {
                    "type": "string", "enum": ["office_manager", "physician", "staff",
                                               "patient"]}},
                "practice_id": {"type": ["integer", "null"]}, "active": {"type": "boolean"}}},
            "UserPatch": {"type": "object", "properties": {
                "roles": {"type": "array", "items": {"type": "string"}},
                "practice": {"type": "string"}, "active": {"type": "boolean"}}},
            "Identifier": {"type": "object", "properties": {
                "id": {"type": "integer"}, "user_id": {"type": "integer"},
                "key": {"type": "string"}}},
            "IdentifierNew": {"type": "object", "required": ["user_id", "key"], "properties": {
                "user_id": {"type": "integer"},
                "key": {"type": "string", "examples": ["npi:1234567893", "House^Gregory"]}}},
            "Grant": {"type": "object", "properties": {
                "id": {"type": "integer"}, "user_id": {"type": "integer"},
                "study_uid": {"type": ["string", "null"]},
                "patient_record": {"type": ["integer", "null"]},
                "break_glass": {"type": "boolean"}, "reason": {"type": "string"},
                "state": {"type": "string", "enum": ["active", "expired", "revoked"]},
                "expires_at": {"type": ["string", "null"], "format": "date-time"},
                "created_at": {"type": ["string", "null"], "format": "date-time"}}},
            "GrantNew": {"type": "object", "required": ["user_id"], "properties": {
                "user_id": {"type": "integer"}, "study_uid": {"type": "string"},
                "patient_id": {"type": "string"},
                "expires_at": {"type": "string", "format": "date-time"},
                "reason": {"type": "string"}, "break_glass": {"type": "boolean"}}},
            "InvitationNew": {"type": "object", "required": ["roles"], "properties": {
                "email": {"type": "string"}, "practice": {"type": "string"},
                "roles": {"type": "array", "items": {"type": "string"}}}},
            "RevokeRequest": {"type": "object", "required": ["ids"], "properties": {
                "ids": {"type": "array", "items": {"type": "integer"}}}},
        },
    },
}
