"""What a view allows is marked on the view (``@public``, ``@share_visible``, ``@download``,
``share_reads(blueprint)``) and the access policy reads those marks, nothing else; templates
ask ``may(action)`` instead of reading roles (docs/architecture.md "What may import what")."""

from __future__ import annotations

from flask import Blueprint, Flask, g, render_template

from portal.access import policy
from portal.access.principal import Principal, loaders
from tests.sharing.conftest import build_world, make_share, open_link


def _probe_blueprints(app: Flask) -> None:
    """Views of a package the policy has never heard of, registered before the first request."""
    probe = Blueprint("probe", __name__, url_prefix="/probe")

    @probe.get("/unmarked/<study_uid>")
    def unmarked(study_uid: str) -> str:
        return "unmarked"

    @probe.get("/shared/<study_uid>")
    @policy.share_visible
    def shared(study_uid: str) -> str:
        return "shared"

    @probe.get("/file/<study_uid>")
    @policy.share_visible
    @policy.download
    def file(study_uid: str) -> str:
        return "file"

    reads = policy.share_reads(Blueprint("probe_reads", __name__, url_prefix="/probe-reads"))

    @reads.route("/thing", methods=["GET", "POST"])
    def thing() -> str:
        return "thing"

    app.register_blueprint(probe)
    app.register_blueprint(reads)


def test_a_share_visitor_reaches_only_what_the_marks_allow(app: Flask) -> None:
    _probe_blueprints(app)
    world = build_world(app)
    view_only, with_files = app.test_client(), app.test_client()
    made, downloadable = make_share(world), make_share(world, can_download=True)
    assert open_link(view_only, made.token, made.pin).status_code == 303
    assert open_link(with_files, downloadable.token, downloadable.pin).status_code == 303
    study = world.study

    # An unmarked view does not exist for a visitor (404, like a missing page).
    assert view_only.get(f"/probe/unmarked/{study}").status_code == 404
    assert with_files.get(f"/probe/unmarked/{study}").status_code == 404
    # Marked share-visible: reached.
    assert view_only.get(f"/probe/shared/{study}").get_data(as_text=True) == "shared"
    # Marked a download: only a link with the download permission; the refusal says why.
    refused = view_only.get(f"/probe/file/{study}")
    assert refused.status_code == 403
    assert "viewing only" in refused.get_data(as_text=True)
    assert with_files.get(f"/probe/file/{study}").get_data(as_text=True) == "file"
    # A blueprint whose reads are share-visible: its GET answers, its POST does not exist.
    assert view_only.get("/probe-reads/thing").get_data(as_text=True) == "thing"
    assert view_only.post("/probe-reads/thing").status_code == 404


def test_the_portals_own_views_carry_the_marks_the_lists_used_to_name(app: Flask) -> None:
    """The endpoints SHARE_ENDPOINTS and DOWNLOAD_ENDPOINTS listed are marked, and no view
    outside the share pages and DICOMweb is share-visible beyond them."""
    marks = {endpoint: policy.allows(view) for endpoint, view in app.view_functions.items()}
    downloads = {e for e, (_, is_download) in marks.items() if is_download}
    assert downloads == {"dicomweb.retrieve_study", "dicomweb.retrieve_series",
                         "dicomweb.retrieve_instance", "dicomweb.retrieve_frames",
                         "dicomweb.retrieve_bulkdata", "studies.download_study",
                         "reports.report_pdf_view"}
    visible = {e for e, (shared, _) in marks.items()
               if shared and not e.startswith("sharing.")}
    # Since: a visitor reads saved measurements and measures a region (issue 20), compares
    # with a prior his link opens, and chooses his language (issue 21).
    assert visible == {"studies.study_page", "studies.viewer", "studies.download_study",
                       "reports.report_pdf_view", "measurements.saved", "measurements.region",
                       "studies.compare", "i18n.choose_language"}
    assert getattr(app.blueprints["dicomweb"], "portal_share_reads", False)
    assert not any(getattr(bp, "portal_share_reads", False)
                   for name, bp in app.blueprints.items() if name != "dicomweb")


def test_auth_and_sharing_register_their_principal_loaders(app: Flask) -> None:
    from portal.auth import bearer
    from portal.sharing.sessions import share_principal

    found = loaders(app)
    assert found.bearer is bearer.user_for_token and found.challenge is bearer.challenge
    assert found.visitors == [share_principal]


def _page_for(app: Flask, principal: Principal | None) -> str:
    with app.test_request_context("/"):
        g.principal = principal
        return render_template("base.html")


def test_templates_ask_may_and_get_the_policys_answer(app: Flask) -> None:
    physician = Principal("user", 1, "doc", roles=frozenset({"physician"}))
    manager = Principal("user", 2, "om", roles=frozenset({"office_manager"}), practice_id=1)
    patient = Principal("user", 3, "pat", roles=frozenset({"patient"}))
    visitor = Principal("share", 4, "share link", share_id="x", can_download=False,
                        via="share")
    page = _page_for(app, physician)
    assert 'href="/orders"' in page and 'href="/admin/"' not in page and "Sign out" in page
    page = _page_for(app, manager)
    assert 'href="/orders"' in page and 'href="/admin/"' in page
    page = _page_for(app, patient)
    assert 'href="/orders"' not in page and 'href="/admin/"' not in page and "Sign out" in page
    assert "Sign out" not in _page_for(app, visitor) and "Sign out" not in _page_for(app, None)
    # The same answers the services get.
    assert policy.allowed(physician, "unread_badges") and not policy.allowed(patient,
                                                                             "unread_badges")
    assert policy.allowed(manager, "all_links") and not policy.allowed(physician, "all_links")
    assert not policy.allowed(visitor, "download") and policy.allowed(None, "download")
    assert policy.allowed(visitor, "shared_visit") and not policy.allowed(visitor, "account")
