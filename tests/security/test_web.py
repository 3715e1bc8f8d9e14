"""The web surface: the core service's local API (every route in its table) and the UI's
rendering of untrusted text.

* Without the service token, and with the token but a session that is not one, every route
  answers 401 and nothing else: only ``GET /health`` is public, and ``POST /auth/login`` is the
  only thing a caller without a session can usefully reach (requests with the token and no
  session are the host's own operator, the CLI, by design).
* A signed-in staff user gets 403 from every ``/admin/*`` route (and the admin-only /status and
  /reconcile).
* Uploaded file names cannot leave the documents folder: each hostile name is either refused
  with a 4xx or saved inside with a plain name, never a 500, and nothing appears outside.
* Answers and passages holding ``<script>``, ``<img onerror>`` or ``[x](javascript:...)`` come
  out of the UI's helpers, and out of the chat page itself (AppTest), as inert text.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.api import SESSION_HEADER, ServiceClient
from appliance.core.settings import load_settings
from tests.ui.test_app import without_own_markup

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PASSWORD = "correct horse battery"
PUBLIC = {("GET", "/health")}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real core service (real embedder, store and accounts; no chat model: not needed)."""
    from appliance.wiring import open_core_service, prepare_process

    root = tmp_path_factory.mktemp("websec")
    docs = root / "docs"
    (docs / "legal").mkdir(parents=True)
    (docs / "legal" / "contract.md").write_text("# Contract\n\nThe contract runs 36 months.\n")
    settings = load_settings(
        env={},
        overrides={
            "data_dir": str(root / "data"),
            "service": {"port": 0},
            "metrics": {"port": 0},
            "ingest": {"docs_dir": str(docs), "debounce_s": 0.2, "reconcile_interval_s": 0},
        },
    )
    prepare_process(settings)
    svc = open_core_service(settings, docs, role="security-tests", answering=False)
    svc.start()
    svc.accounts.add_user("staffer", PASSWORD, role="staff", groups=["legal-team"])
    svc.accounts.add_user("chief", PASSWORD, role="admin", groups=["legal-team"])
    svc.accounts.grant("legal-team", ["legal"])
    yield svc
    svc.close()


def raw_call(
    service: Any, method: str, path: str, headers: dict[str, str], body: dict[str, Any] | None
) -> tuple[int, Any]:
    """One request with exactly these headers (no client conveniences)."""
    conn = http.client.HTTPConnection("127.0.0.1", service.api.port, timeout=30)
    try:
        data = json.dumps(body or {}).encode() if method == "POST" else None
        conn.request(
            method, path, body=data, headers={"Content-Type": "application/json", **headers}
        )
        response = conn.getresponse()
        payload = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(payload or b"null")
    except ValueError:
        return response.status, payload


def routes(service: Any) -> list[tuple[str, str]]:
    """Every (method, path) the service answers, read from its own route table."""
    table = sorted(service.api.routes)
    assert ("POST", "/auth/login") in table
    assert len(table) > 20  # the table was really read, not an empty stand-in
    return table


def sign_in(service: Any, username: str) -> ServiceClient:
    client = ServiceClient.find(service.settings.data_dir)
    assert client is not None
    reply = client.call("POST", "/auth/login", {"username": username, "password": PASSWORD})
    return client.with_session(reply["session"])


# --- authentication ----------------------------------------------------------------------------


def test_without_the_token_only_health_answers(service: Any) -> None:
    reached = {}
    for method, path in [*routes(service), ("GET", "/no/such/route"), ("POST", "/admin/x")]:
        status, body = raw_call(service, method, path, {}, {"username": "chief"})
        reached[(method, path)] = status
        if (method, path) in PUBLIC:
            assert (status, body) == (200, {"ok": True})
        else:
            assert status == 401, (method, path, status)
            assert body == {"error": "missing or wrong token"}, (method, path)
    wrong = {"Authorization": "Bearer " + "x" * 43}
    for method, path in routes(service):
        if (method, path) not in PUBLIC:
            assert raw_call(service, method, path, wrong, {})[0] == 401, (method, path)


def test_a_session_that_is_not_one_reaches_nothing(service: Any) -> None:
    token = {"Authorization": f"Bearer {service.api.token}"}
    for session in ("not-a-session", "x" * 64, "' OR 1=1 --"):
        headers = {**token, SESSION_HEADER: session}
        for method, path in routes(service):
            if (method, path) in PUBLIC:
                continue
            # /auth/login ignores the session; with no credentials it is refused all the same
            status, body = raw_call(service, method, path, headers, {})
            assert status == 401, (method, path, session, status, body)
            assert set(body) <= {"error", "type"}, (method, path)


def test_staff_is_refused_every_admin_route(service: Any) -> None:
    staff = sign_in(service, "staffer")
    token = {"Authorization": f"Bearer {staff.token}", SESSION_HEADER: str(staff.session)}
    admin_routes = [r for r in routes(service) if r[1].startswith("/admin/")]
    admin_routes += [("GET", "/status"), ("POST", "/reconcile")]
    assert len(admin_routes) >= 10
    bodies: dict[str, dict[str, Any]] = {
        "/admin/users/create": {"username": "mallory", "password": PASSWORD, "role": "admin"},
        "/admin/users/update": {"username": "staffer", "role": "admin"},
        "/admin/grants": {"group": "legal-team", "grant": ["hr"]},
        "/admin/upload": {"name": "x.md", "content_b64": base64.b64encode(b"# x").decode()},
    }
    for method, path in admin_routes:
        status, body = raw_call(service, method, path, token, bodies.get(path, {}))
        assert status == 403, (method, path, status, body)
    # nothing the refused calls asked for happened
    assert service.accounts.user("mallory") is None
    assert service.accounts.user("staffer")["role"] == "staff"
    assert not (service.ingestion.docs_dir / "x.md").exists()
    assert staff.call("GET", "/auth/me")["role"] == "staff"


# --- uploads -----------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "../x1.md",
    "../../x2.md",
    "/etc/x3.md",
    "/tmp/x4.md",
    "..\\x5.md",
    "..\\..\\x6.md",
    "C:\\Windows\\x7.md",
    "a\x00b.md",
    "x8.md\x00.txt",
    "..",
    ".",
    "../",
    "..%2fx9.md",
    "\uff0e\uff0e/x10.md",  # fullwidth dots: NFKC turns them into ".."
    "\u2024\u2024/x11.md",  # one-dot leaders
    ".\u200b./x12.md",  # a zero-width space between the dots
    "x" * 300 + ".md",
    "\u00e9" * 150 + ".md",  # 150 characters, 300 bytes: over the file system's 255
    "line\nbreak.md",
    "-rf.md",
    ".hidden.md",
]
HOSTILE_FOLDERS = ["..", "../outside", "/etc", "..\\x", "a/../../b", "legal/../..", "\uff0e\uff0e"]


def _upload(admin: ServiceClient, name: str, folder: str = "") -> tuple[int, Any]:
    body = {"name": name, "folder": folder, "content_b64": base64.b64encode(b"# up\n").decode()}
    headers = {"Authorization": f"Bearer {admin.token}", SESSION_HEADER: str(admin.session)}
    conn = http.client.HTTPConnection(admin.host, admin.port, timeout=30)
    try:
        conn.request("POST", "/admin/upload", body=json.dumps(body).encode(), headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_upload_names_cannot_leave_the_documents_folder(service: Any) -> None:
    admin = sign_in(service, "chief")
    docs = service.ingestion.docs_dir.resolve()
    root = docs.parent  # the data folder and everything else of the test lives here
    before = _files(root) - _files(docs)
    outcomes = []
    for name, folder in [
        *((n, "") for n in HOSTILE_NAMES),
        *(("ok.md", f) for f in HOSTILE_FOLDERS),
    ]:
        status, reply = _upload(admin, name, folder)
        assert status != 500, (name, folder, reply)
        if status == 200:
            saved = (docs / reply["path"]).resolve()
            assert saved.is_relative_to(docs), (name, folder, reply)
            assert saved.is_file()
            parts = Path(reply["path"]).parts
            assert ".." not in parts
            assert "\x00" not in reply["path"]
            assert not any(p.startswith(".") for p in parts), reply
            outcomes.append((name, folder, "saved as " + repr(reply["path"])))
        else:
            assert 400 <= status < 500, (name, folder, status)
            outcomes.append((name, folder, f"refused {status}: {reply['error']}"))
    assert _files(root) - _files(docs) == before, "an upload landed outside the documents folder"
    print("\n| name | folder | outcome |\n|---|---|---|")
    for name, folder, outcome in outcomes:
        print(f"| {name[:40]!r} | {folder!r} | {outcome[:100]} |")


# --- rendering untrusted text ------------------------------------------------------------------

HOSTILE_TEXT = [
    "<script>alert(document.cookie)</script>",
    '<img src=x onerror="alert(1)">',
    "[click me](javascript:alert(1))",
    "[x]( javascript:alert(1) )",
    "<a href='javascript:alert(1)'>x</a>",
    "![pixel](http://evil.example/p.png)",
    "<iframe src=//evil.example></iframe>",
    "<svg/onload=alert(1)>",
    ":red[spoofed] **urgent**",
    "<https://evil.example>",
]


def _render(markdown: str) -> str:
    markdown_it = pytest.importorskip("markdown_it", reason="markdown-it-py renders the check")
    parser = markdown_it.MarkdownIt("commonmark", {"html": True, "linkify": False})
    return str(parser.render(markdown))


def _inert(markdown: str) -> bool:
    """No tag but <p> and <br /> in the rendered HTML (so no link, image, script or handler:
    what is left of ``href=`` or ``onerror=`` is text between them)."""
    return not re.search(r"<(?!/?p>|br />)", _render(markdown))


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_helpers_render_hostile_text_inert(text: str) -> None:
    from ui.formatting import source_title
    from ui.safe import label, md

    assert not _inert("<b>raw</b> <https://x.example>")  # the check does see live markup
    assert _inert(md(text))
    assert _inert(label(text))
    assert _inert(label(source_title({"number": 1, "path": f"legal/{text}.md", "page": 2})))


def test_chat_page_renders_hostile_answers_and_sources_inert() -> None:
    """The chat page's own code (AppTest) with an answer and a source full of markup."""
    from streamlit.testing.v1 import AppTest

    def page() -> None:
        import streamlit as st

        from ui.views import chat

        st.session_state.setdefault(chat.FILES, {})
        hostile = "\n".join(  # AppTest runs only this function's source: no globals
            [
                "<script>alert(document.cookie)</script>",
                '<img src=x onerror="alert(1)">',
                "[click me](javascript:alert(1))",
                "<svg/onload=alert(1)> :red[spoofed] **urgent** <https://evil.example>",
            ]
        )
        chat._exchange(
            None,  # type: ignore[arg-type]  # no call is made: no button is clicked
            {
                "id": None,
                "question": hostile,
                "answer": hostile,
                "sources": [{"number": 1, "path": "legal/<script>.md", "page": 1, "text": hostile}],
            },
            1,
        )

    at = AppTest.from_function(page, default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    shown = [e.value for e in at.markdown] + [e.value for e in at.caption]
    shown += [e.label for e in at.expander]
    assert len(shown) >= 4
    for value in shown:
        # The UI's own markup (the source anchor heading and links, highlights) is allowed;
        # everything that came from the answer or the document must be inert.
        assert _inert(without_own_markup(str(value))), value
    assert any("script" in str(v) for v in shown)  # the text is there, only inert
    assert all(not getattr(e, "allow_html", False) for e in at.markdown)
