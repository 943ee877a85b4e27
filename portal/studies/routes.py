"""The portal's home page (the study list arrives with sign-in)."""

from __future__ import annotations

from flask import Blueprint, render_template

from portal.access.policy import public

bp = Blueprint("studies", __name__)


@bp.get("/")
@public
def home() -> str:
    """Front page: what the portal is and how machines reach it. Shows no patient data."""
    return render_template("studies/home.html")
