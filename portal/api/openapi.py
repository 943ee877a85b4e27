"""The OpenAPI 3.1 document served at /api/openapi.json."""

from __future__ import annotations

from typing import Any

from portal.i18n import SUPPORTED

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


def _query(name: str, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": {"type": kind}}


_SHARE_ID = {"name": "id", "in": "path", "required": True,
             "schema": {"type": "string", "format": "uuid"}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Referrer portal API", "version": "1",
             "description": "Office-manager actions: people, referrer identifiers, grants, "
                            "audit trail; share links for physicians and office managers. "
                            "DICOMweb lives under /dicomweb (PS3.18)."},
    "paths": {
        "/api/users": {"get": _op("List people (a practice's manager: its people and those of "
                                  "no practice)", {"200": _list_of("User")})},
        "/api/users/{id}": {"patch": {**_op("Change roles, practice, activation or notices",
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
        "/api/grants/revoke": {"post": _op("Revoke grants, all or nothing (a practice's "
                                           "manager: grants his practice may see)",
                                           {"200": {"description": "Revoked"},
                                            "400": _ERROR, "403": _ERROR}, "RevokeRequest")},
        "/api/shares": {
            "get": {**_op("Share links I may manage (office managers: all)",
                          {"200": _list_of("Share")}),
                    "parameters": [{"name": "study", "in": "query",
                                    "schema": {"type": "string"}}]},
            "post": _op("Make a share link (the link and PIN are returned once)",
                        {"201": _one("ShareCreated", "Made"), "400": _ERROR,
                         "404": {"description": "No such study, or not visible to the caller"},
                         "429": {"description": "Too many links this hour"}}, "ShareNew")},
        "/api/shares/{id}": {"get": {**_op("One link with each access",
                                           {"200": _one("Share"), "404": _ERROR}),
                                     "parameters": [_SHARE_ID]}},
        "/api/shares/{id}/revoke": {"post": {**_op("Revoke one link (open sessions end)",
                                                   {"200": _one("Share"), "404": _ERROR}),
                                             "parameters": [_SHARE_ID]}},
        "/api/shares/revoke": {"post": _op("Revoke every link of a study or of its patient",
                                           {"200": {"description": "How many were revoked"},
                                            "400": _ERROR}, "ShareRevokeAll")},
        "/api/audit": {"get": {**_op("Read the audit trail (a practice's manager: the records "
                                     "about its studies and of its people)",
                                     {"200": {"description": "OK"}}),
                               "parameters": [{"name": n, "in": "query", "schema": {
                                   "type": "integer" if n in ("limit", "offset")
                                   else "string"}} for n in ("who", "study", "event",
                                                             "patient", "from", "to",
                                                             "limit", "offset")]}},
        "/api/search/studies": {"get": {
            **_op("Find studies the caller's practice may see (patient name as typed, patient "
                  "ID, accession; date range, modality; newest or sort=oldest first)",
                  {"200": {"description": "studies (patient name, description, date, UID), "
                                          "more, page"}, "400": _ERROR}),
            "parameters": [_query(n) for n in ("q", "from", "to", "modality", "sort")]
            + [_query("page", "integer")]}},
        "/api/search/people": {"get": {
            **_op("Find active people by name or e-mail (nobody for an empty query)",
                  {"200": {"description": "id, name, email, roles of each"}}),
            "parameters": [_query("q"), _query("role")]}},
        "/api/grants/bulk": {"post": _op(
            "Give several people several studies or patients' every study (one grant and one "
            "audit record each; all or nothing)",
            {"201": _list_of("Grant"), "400": _ERROR}, "GrantBulk")},
        "/api/grants/restore": {"post": _op("Undo revocations (not emergency access)",
                                            {"201": _list_of("Grant"), "400": _ERROR},
                                            "RevokeRequest")},
        "/api/users/{id}/grants/revoke": {"post": {
            **_op("Take away every live grant of a person",
                  {"200": {"description": "revoked: the grant ids"}, "400": _ERROR}),
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "integer"}}]}},
        "/api/patients/{id}/links": {"get": {
            **_op("Share links still open for any study of a patient",
                  {"200": _list_of("Share"), "404": {"description": "No such patient"}}),
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "integer"}}]}},
        "/api/shares/revoke-many": {"post": _op(
            "Revoke several links in one step (all or nothing)",
            {"200": {"description": "How many were revoked"}, "400": _ERROR},
            "ShareRevokeMany")},
        "/api/attention": {"get": _op("What needs attention (counts)",
                                      {"200": {"description": "OK"}})},
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
                "practice_id": {"type": ["integer", "null"]}, "active": {"type": "boolean"},
                "phone_number": {"type": "string"}, "notify_by_sms": {"type": "boolean"}}},
            "UserPatch": {"type": "object", "properties": {
                "roles": {"type": "array", "items": {"type": "string"}},
                "practice": {"type": "string"}, "active": {"type": "boolean"},
                "phone_number": {"type": "string", "description":
                                 "mobile number with country code, e.g. +4917012345678; "
                                 "empty clears it"},
                "notify_by_sms": {"type": "boolean", "description":
                                  "report-ready notices also by text message"}}},
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
            "Share": {"type": "object", "properties": {
                "id": {"type": "string", "format": "uuid"},
                "state": {"type": "string", "enum": ["active", "pending", "expired",
                                                     "revoked", "locked"]},
                "audience": {"type": "string", "enum": ["patient", "physician"]},
                "requires_sign_in": {"type": "boolean"}, "download": {"type": "boolean"},
                "pin": {"type": "boolean"}, "note": {"type": "string"},
                "study_uids": {"type": "array", "items": {"type": "string"}},
                "created_by": {"type": "string"},
                "created_at": {"type": "string", "format": "date-time"},
                "not_before": {"type": "string", "format": "date-time"},
                "expires_at": {"type": "string", "format": "date-time"},
                "revoked_at": {"type": ["string", "null"], "format": "date-time"},
                "uses": {"type": "integer"}, "failed_attempts": {"type": "integer"},
                "last_used_at": {"type": ["string", "null"], "format": "date-time"},
                "accesses": {"type": "array", "items": {"type": "object"}}}},
            "ShareCreated": {"allOf": [{"$ref": "#/components/schemas/Share"}, {
                "type": "object", "properties": {
                    "link": {"type": "string",
                             "description": "/s?lang=<language>#<token>: shown once"},
                    "pin_code": {"type": ["string", "null"],
                                 "description": "shown once; deliver apart from the link"}}}]},
            "ShareNew": {"type": "object", "required": ["study_uid"], "properties": {
                "study_uid": {"type": "string"}, "whole_patient": {"type": "boolean"},
                "series": {"type": "array", "items": {"type": "string"},
                           "description": "only these Series Instance UIDs of the study"},
                "audience": {"type": "string", "enum": ["patient", "physician"]},
                "requires_sign_in": {"type": "boolean"}, "download": {"type": "boolean"},
                "pin": {"type": "boolean", "default": True},
                "days": {"type": "integer", "minimum": 1, "maximum": 30, "default": 7},
                "expires_at": {"type": "string", "format": "date-time"},
                "not_before": {"type": "string", "format": "date-time"},
                "note": {"type": "string"}, "notify_sender": {"type": "boolean"},
                "language": {"type": "string", "enum": list(SUPPORTED),
                             "description": "of the link's messages and pages; default: "
                                            "the patient's account language when known"}}},
            "ShareRevokeAll": {"type": "object", "required": ["study_uid"], "properties": {
                "study_uid": {"type": "string"},
                "scope": {"type": "string", "enum": ["study", "patient"]}}},
            "ShareRevokeMany": {"type": "object", "required": ["ids"], "properties": {
                "ids": {"type": "array", "items": {"type": "string", "format": "uuid"}}}},
            "GrantBulk": {"type": "object", "required": ["user_ids"], "properties": {
                "user_ids": {"type": "array", "items": {"type": "integer"}},
                "study_uids": {"type": "array", "items": {"type": "string"}},
                "patient_records": {"type": "array", "items": {"type": "integer"},
                                    "description": "patient ids from /api/search/studies "
                                                   "(patient_record)"},
                "expires_at": {"type": "string", "format": "date-time"},
                "reason": {"type": "string"}}},
        },
    },
}
