"""The Streamlit UI against a real core service, driven with Streamlit's ``AppTest``."""

from __future__ import annotations

import re
import string
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from appliance.core.errors import ServiceError
from tests.ui.conftest import ADMIN, APP, STAFF, Core, wait_indexed

ACME = "How long does the supply contract with Acme run?"
LEAVE = "How many days of paid annual leave does an employee get?"

MakeApp = Callable[..., AppTest]


def sign_in(at: AppTest, user: tuple[str, str]) -> AppTest:
    at.text_input(key="login.username").input(user[0])
    at.text_input(key="login.password").input(user[1])
    return at.button[0].click().run()


def texts(at: AppTest) -> str:
    """Every Markdown, caption, error and info text on the page, joined."""
    parts = [e.value for e in at.markdown] + [e.value for e in at.caption]
    parts += (
        [e.value for e in at.error] + [e.value for e in at.info] + [e.value for e in at.success]
    )
    return "\n".join(str(p) for p in parts)


def unescape(markdown: str) -> str:
    """What a reader sees of ``ui.safe.md`` output (for plain assertions)."""
    return markdown.replace("  \n", "\n").replace("\\", "")


def is_literal(markdown: str) -> bool:
    """Whether every ASCII punctuation character is backslash-escaped (so none is markup)."""
    chars = iter(markdown)
    for char in chars:
        if char == "\\":
            next(chars, None)
        elif char in string.punctuation:
            return False
    return True


# The UI's own Markdown around escaped text (ui.evidence, the source anchors in ui.views.chat)
OWN_MARKUP = re.compile(
    r":(?:yellow-background|gray)\[|:red-badge\[Unverified\]|"
    r":blue-badge\[:material/format_quote: Quoted from the documents\]|"
    r"\[\\\[\d+\\\]\]\(#source-\d+-of-answer-\d+\)|^> |^###### |(?<!\\)\]"
)


def without_own_markup(markdown: str) -> str:
    """``markdown`` less the UI's own markup, line by line: what is left must be literal."""
    return "  \n".join(OWN_MARKUP.sub("", line) for line in markdown.split("  \n"))


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def ask(at: AppTest, question: str) -> AppTest:
    at.chat_input[0].set_value(question).run()
    assert_clean(at)
    return at


# --- the service and sign-in -------------------------------------------------------------------


def test_no_running_service_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(tmp_path / "no-service"))
    at = AppTest.from_file(str(APP)).run()
    assert_clean(at)
    assert "core service is not running" in at.error[0].value
    assert "appliance up" in at.error[0].value
    assert not at.text_input
    assert not at.chat_input


def test_wrong_password_shows_an_error_and_no_chat(app: MakeApp) -> None:
    at = app()
    assert [t.value for t in at.title] == ["Sign in"]
    assert not at.chat_input
    sign_in(at, (ADMIN[0], "not-the-password"))
    assert_clean(at)
    assert "invalid username or password" in at.error[0].value.lower().replace("\\", "")
    assert not at.chat_input
    assert "auth.token" not in at.session_state


def test_right_password_shows_chat_and_sign_out_returns_to_the_form(app: MakeApp) -> None:
    at = sign_in(app(), STAFF)
    assert_clean(at)
    assert [t.value for t in at.title] == ["Chat"]
    assert len(at.chat_input) == 1
    assert "Signed in as sam" in unescape(texts(at))
    next(b for b in at.sidebar.button if b.label == "Sign out").click().run()
    assert [t.value for t in at.title] == ["Sign in"]
    assert "signed out" in at.info[0].value


def test_an_expired_session_shows_the_sign_in_form_again(app: MakeApp, core: Core) -> None:
    core.service.accounts.add_user("eve", "eve-password-1", role="staff", groups=["hr"])
    at = sign_in(app(), ("eve", "eve-password-1"))
    assert at.chat_input
    core.service.accounts.end_sessions("eve")
    at.run()
    assert_clean(at)
    assert [t.value for t in at.title] == ["Sign in"]
    assert "session expired" in at.info[0].value
    assert not at.chat_input


# --- chat --------------------------------------------------------------------------------------


def test_an_answer_streams_in_with_its_sources_and_a_download(app: MakeApp) -> None:
    at = ask(sign_in(app(), ADMIN), ACME)
    shown = unescape(texts(at))
    assert "36 months" in shown
    # which model answered: the registry version this user may be served (issue 13)
    assert "Answered by model base (SmolLM2" in shown
    expanders = [e for e in at.expander if "contract.md" in unescape(e.label)]
    assert expanders, [e.label for e in at.expander]
    source = expanders[0]
    assert "Acme Ltd runs for 36 months" in unescape("\n".join(m.value for m in source.markdown))
    source.button[0].click().run()  # "Get the file"
    assert_clean(at)
    downloads = at.get("download_button")
    assert downloads, "the download button did not appear"
    files = at.session_state["chat.files"]
    name, _content_type, data = files["legal/contract.md"]
    assert name == "contract.md"
    assert b"36 months" in data


def test_feedback_is_stored_with_the_comment(app: MakeApp, core: Core) -> None:
    at = ask(sign_in(app(), STAFF), LEAVE)
    message = at.session_state["chat.messages"][-1]
    assert message["id"] is not None
    assert "27" in message["answer"]
    at.feedback[0].set_value(0).run()  # thumbs down
    assert_clean(at)
    stored = [f for f in core.service.conversations.feedback() if f["message"] == message["id"]]
    assert [(f["user"], f["rating"]) for f in stored] == [("sam", "down")]

    at.text_input(key=f"comment-text-{message['id']}").input("It left out the carry-over")
    next(b for b in at.button if b.label == "Send comment").click().run()
    assert_clean(at)
    stored = [f for f in core.service.conversations.feedback() if f["message"] == message["id"]]
    assert [(f["rating"], f["comment"]) for f in stored] == [("down", "It left out the carry-over")]
    stats = core.session(*ADMIN).call("GET", "/admin/feedback")
    assert stats["down"] >= 1

    at.feedback[0].set_value(1).run()  # changed to thumbs up: the comment stays
    assert_clean(at)
    stored = [f for f in core.service.conversations.feedback() if f["message"] == message["id"]]
    assert [(f["rating"], f["comment"]) for f in stored] == [("up", "It left out the carry-over")]


def test_staff_answers_come_only_from_granted_collections(app: MakeApp) -> None:
    # The same question finds the contract for an admin, so its absence from sam's sources is
    # the grant at work, not a question that finds nothing.
    admin = ask(sign_in(app(), ADMIN), ACME).session_state["chat.messages"][-1]
    assert "legal/contract.md" in [s["path"] for s in admin["sources"]]
    # sam (group hr) may not read legal/: the service leaves the contract out of his sources
    staff = ask(sign_in(app(), STAFF), ACME).session_state["chat.messages"][-1]
    paths = [s["path"] for s in staff["sources"]]
    assert "legal/contract.md" not in paths
    assert all(not p.startswith("legal/") for p in paths), paths
    assert "36 months" not in staff["answer"]


def test_conversations_resume_rename_and_delete(app: MakeApp, core: Core) -> None:
    core.service.accounts.add_user("cleo", "cleo-password-1", role="staff", groups=["hr"])
    first = ask(sign_in(app(), ("cleo", "cleo-password-1")), LEAVE)
    conversation = first.session_state["chat.conversation"]
    assert conversation

    at = sign_in(app(), ("cleo", "cleo-password-1"))  # a new browser session
    assert not at.session_state["chat.messages"]
    at.button(key=f"open-{conversation}").click().run()
    assert_clean(at)
    assert LEAVE in unescape(texts(at))

    title = next(t for t in at.sidebar.text_input if t.label == "Title")
    title.input("Leave rules")
    next(b for b in at.sidebar.button if b.label == "Rename").click().run()
    assert_clean(at)
    cleo = core.session("cleo", "cleo-password-1")
    assert [c["title"] for c in cleo.call("GET", "/conversations")] == ["Leave rules"]

    next(b for b in at.sidebar.button if b.label == "Delete").click().run()
    next(b for b in at.sidebar.button if b.label == "Delete it").click().run()
    assert_clean(at)
    assert cleo.call("GET", "/conversations") == []
    assert at.session_state["chat.conversation"] is None


def test_a_conversation_deleted_elsewhere_is_an_error_and_a_fresh_chat(
    app: MakeApp, core: Core
) -> None:
    conversation = core.service.conversations.create("sam", "Soon gone")
    at = sign_in(app(), STAFF)
    core.service.conversations.delete("sam", conversation)
    at.button(key=f"open-{conversation}").click().run()  # the list on screen is stale
    assert_clean(at)
    assert "no conversation" in unescape(at.error[0].value).lower()
    assert at.session_state["chat.conversation"] is None
    assert at.chat_input


def test_untrusted_text_is_shown_literally(app: MakeApp, core: Core) -> None:
    """Markup in a question, an answer, a passage, a file name or a title stays text."""
    store = core.service.conversations
    hostile = "<script>alert(1)</script>"
    # History shows a source only while its document is indexed and readable (revocation):
    # the document with the hostile name really is in sam's collection.
    rel = 'hr/<img src=x onerror="alert(4)">.md'
    (core.docs / rel).write_text("# Hostile name\n\nA document whose name is markup.\n")
    ingestion = core.service.ingestion
    deadline = time.monotonic() + 60
    while ingestion.state.file(ingestion.searcher.collection, rel) is None:
        assert time.monotonic() < deadline, "the watcher did not index the document"
        time.sleep(0.2)
    conversation = store.create("sam", f"Title {hostile}")
    store.add(
        "sam",
        conversation,
        {
            "question": f"Question {hostile}",
            "answer": 'Answer <img src=x onerror="alert(2)"> [link](javascript:alert(3))',
            "sources": [
                {
                    "number": 1,
                    "path": 'hr/<img src=x onerror="alert(4)">.md',
                    "page": None,
                    "heading": "<b>heading</b>",
                    "text": f"Passage {hostile} :red[red] **bold**",
                    "score": 1.0,
                }
            ],
            "abstained": False,
            "model": "test",
        },
    )
    at = sign_in(app(), STAFF)
    at.button(key=f"open-{conversation}").click().run()
    assert_clean(at)
    assert not at.get("html")
    markdown = [m.value for m in at.markdown]
    labels = [e.label for e in at.expander] + [b.label for b in at.sidebar.button]
    for value in markdown + labels:
        assert is_literal(without_own_markup(value)), value
    shown = unescape("\n".join(markdown + labels))
    assert f"Question {hostile}" in shown
    assert 'Answer <img src=x onerror="alert(2)"> [link](javascript:alert(3))' in shown
    assert f"Passage {hostile} :red[red] **bold**" in shown
    assert '<img src=x onerror="alert(4)">.md, <b>heading</b>' in shown
    assert f"Title {hostile}" in shown


# --- admin pages and roles ---------------------------------------------------------------------


def test_admin_pages_are_there_for_an_admin(app: MakeApp) -> None:
    at = sign_in(app(), ADMIN)
    at.switch_page("views/documents.py").run()
    assert_clean(at)
    assert [t.value for t in at.title] == ["Documents"]
    files = at.dataframe[-1].value
    assert {"legal/contract.md", "hr/leave.md", "handbook.md"} <= set(files["File"])
    assert len(at.get("file_uploader")) == 1
    at.toggle(key="documents.auto").set_value(True).run()  # refreshes itself while indexing
    assert_clean(at)
    assert int(at.metric[0].value) >= 3  # documents

    at.switch_page("views/users.py").run()
    assert_clean(at)
    assert [t.value for t in at.title] == ["Users"]
    assert {"ada", "sam"} <= set(at.dataframe[0].value["User"])

    at.switch_page("views/models.py").run()
    assert_clean(at)
    assert [t.value for t in at.title] == ["Models"]
    assert "SmolLM2" in " ".join(str(v) for v in at.dataframe[0].value["Value"])
    versions = at.dataframe[1].value
    assert list(versions["Version"]) == ["base"]
    assert list(versions["Active"]) == ["●"]

    at.switch_page("views/finetune.py").run()
    assert_clean(at)
    assert [t.value for t in at.title] == ["Fine-tuning"]
    assert "No fine-tuning runs yet." in texts(at)
    assert "appliance dataset build" in texts(at)  # no dataset: the form says how to build one


def test_a_run_page_shows_how_its_precision_was_chosen(app: MakeApp, core: Core) -> None:
    """The precision record a run writes into its config.json (finetune.precision), as the
    admin runs route serves it; the run folder is written here, no training runs."""
    import json
    import shutil

    folder = core.settings.runs_dir / "20260101-000000-abcd"
    folder.mkdir(parents=True)
    try:
        (folder / "request.json").write_text(json.dumps({"run": folder.name, "dataset": "d"}))
        (folder / "state.json").write_text(json.dumps({"status": "training"}))
        trial = {"load_s": 1.0, "warmup_s": 2.0, "error": None, "need_mb": 900}
        precision = {
            "requested": "auto",
            "chosen": "lora-fp32",
            "reason": "fastest of 2 measured candidates",
            "candidates": [
                {**trial, "name": "nf4-bf16", "step_s": 51.5, "skipped": None},
                {**trial, "name": "nf4-fp32", "step_s": None, "skipped": "needs about 9 GiB"},
                {**trial, "name": "lora-fp32", "step_s": 5.25, "skipped": None},
            ],
        }
        (folder / "config.json").write_text(json.dumps({"precision": precision}))
        at = sign_in(app(), ADMIN)
        at.switch_page("views/finetune.py").run()
        assert_clean(at)
        assert "Precision: **lora-fp32** (fastest of 2 measured candidates)" in unescape(texts(at))
        table = at.dataframe[0].value
        assert list(table["Candidate"]) == ["nf4-bf16", "nf4-fp32", "lora-fp32"]
        assert list(table["Step (s)"])[::2] == [51.5, 5.25]
        assert "needs about 9 GiB" in list(table["Note"])
    finally:
        shutil.rmtree(folder)


def test_admin_pages_are_absent_for_staff(app: MakeApp) -> None:
    at = sign_in(app(), STAFF)
    assert [t.value for t in at.title] == ["Chat"]
    for page in (
        "views/documents.py",
        "views/users.py",
        "views/models.py",
        "views/finetune.py",
    ):
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            at.switch_page(page)


def test_the_service_refuses_admin_routes_to_staff(core: Core) -> None:
    staff = core.session(*STAFF)
    for method, path in [("GET", "/admin/users"), ("GET", "/admin/documents")]:
        with pytest.raises(ServiceError) as refused:
            staff.call(method, path)
        assert refused.value.status == 403
    with pytest.raises(ServiceError) as refused:
        staff.call("POST", "/admin/users/create", {"username": "x", "password": "y" * 12})
    assert refused.value.status == 403


def test_an_admin_uploads_a_file_into_a_collection(app: MakeApp, core: Core) -> None:
    at = sign_in(app(), ADMIN)
    at.switch_page("views/documents.py").run()
    at.selectbox(key="documents.folder").select("hr").run()
    policy = b"# Parking\n\nStaff parking is free in the north car park.\n"
    at.get("file_uploader")[0].set_value(("parking.md", policy, "text/markdown")).run()
    next(b for b in at.button if b.label == "Add to the documents folder").click().run()
    assert_clean(at)
    assert "Added hr/parking.md" in unescape(texts(at))
    assert (core.docs / "hr" / "parking.md").read_bytes() == policy
    wait_indexed(core.client(), 4)


def test_an_admin_manages_users_and_grants(app: MakeApp, core: Core) -> None:
    at = sign_in(app(), ADMIN)
    at.switch_page("views/users.py").run()
    add = at.form(key="add-user")
    add.text_input[0].input("nina")
    add.text_input[1].input("nina-password-1")
    add.multiselect[0].select("legal")
    add.button[0].click().run()
    assert_clean(at)
    nina = core.service.accounts.user("nina")
    assert nina is not None
    assert (nina["role"], nina["groups"]) == ("staff", ["legal"])

    at.selectbox(key="users.selected").select("nina").run()
    change = at.form(key="change-nina")
    change.selectbox[0].select("admin")
    change.checkbox[0].check()
    change.button[0].click().run()
    assert_clean(at)
    nina = core.service.accounts.user("nina")
    assert nina is not None
    assert (nina["role"], nina["disabled"]) == ("admin", True)

    at.selectbox(key="users.group").select("hr").run()
    grants = at.form(key="grants-hr")
    grants.multiselect[0].select("legal")
    grants.button[0].click().run()
    assert_clean(at)
    assert core.service.accounts.groups()["hr"] == ["hr", "legal"]
    core.service.accounts.revoke("hr", ["legal"])


def test_a_refused_admin_action_is_an_error_not_a_traceback(app: MakeApp) -> None:
    at = sign_in(app(), ADMIN)
    at.switch_page("views/users.py").run()
    add = at.form(key="add-user")
    add.text_input[0].input("shorty")
    add.text_input[1].input("short")
    add.button[0].click().run()
    assert_clean(at)
    assert "too short" in unescape(at.error[0].value)
