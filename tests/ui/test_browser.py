"""End to end in a real browser: the Streamlit server started the way the CLI starts it, headless
Chromium signing in, asking about a shared-corpus filing while the model is busy, and the admin
Documents page.

Writes the screenshots ``docs/screenshots/chat-waiting.png`` (evidence first, the place in the
queue), ``docs/screenshots/chat.png`` (the checked answer, its citation opened on the
highlighted span) and ``docs/screenshots/admin-documents.png``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from appliance.cli import _ui_command, _ui_env
from tests.ui.conftest import ADMIN, ROOT, Core, start_core, stop_core, wait_indexed
from ui.views.chat import PLACEHOLDER

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
CORPUS = Path(__file__).resolve().parents[3] / "shared" / "eval" / "sec10q" / "docs"
FILING = "2023 Q3 AAPL.pdf"
QUESTION = "What were Apple's total net sales for the quarter ended July 1, 2023?"
SCREENSHOTS = ROOT / "docs" / "screenshots"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM}: apt-get install chromium"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed: pip install playwright"
    if not (CORPUS / FILING).is_file():
        return f"the shared corpus is absent ({CORPUS / FILING})"
    return None


@pytest.fixture(scope="module")
def filing_core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Core]:
    """A core service over a copy of one filing (the appliance refuses links out of its
    documents folder, and the shared corpus must never be written to)."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("ui-e2e")
    docs = root / "docs"
    docs.mkdir()
    shutil.copyfile(CORPUS / FILING, docs / FILING)
    core = start_core(root / "data", docs, role="ui-e2e")
    try:
        wait_indexed(core.client(), 1, timeout=300)
        yield core
    finally:
        stop_core(core)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def ui_server(filing_core: Core, tmp_path: Path) -> Iterator[str]:
    """The Streamlit server with the CLI's locked-down flags; yields its URL."""
    settings = filing_core.settings
    settings = settings.model_copy(
        update={"ui": settings.ui.model_copy(update={"port": _free_port()})}
    )
    log = (tmp_path / "streamlit.log").open("wb")
    proc = subprocess.Popen(
        _ui_command(settings), env=_ui_env(settings), stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://{settings.ui.host}:{settings.ui.port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                    if reply.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                output = (tmp_path / "streamlit.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"the Streamlit server did not come up:\n{output}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_sign_in_ask_and_admin_documents_in_chromium(
    ui_server: str, filing_core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    from playwright.sync_api import sync_playwright

    # the held question must take the only turn, whatever the engine decodes together
    monkeypatch.setattr(filing_core.service.answerer.queue, "slots", 1)

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        busy = None
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda request: requested.append(request.url))
            page.on("websocket", lambda socket: requested.append(socket.url))
            page.goto(ui_server)

            page.get_by_role("textbox", name="Username").fill(ADMIN[0])
            page.get_by_role("textbox", name="Password").fill(ADMIN[1])
            page.get_by_role("button", name="Sign in").click()

            ask = page.get_by_placeholder(PLACEHOLDER)
            ask.wait_for(timeout=30_000)
            # Someone else's question has the model (held here mid-answer): the page's question
            # shows its evidence at once and its place in the queue, before any answer.
            busy = filing_core.service.answerer.stream(QUESTION)
            assert next(e for e in busy if e["type"] == "token")
            ask.fill(QUESTION)
            ask.press("Enter")
            page.get_by_text("1 question ahead").wait_for(timeout=60_000)
            page.get_by_text(FILING).first.wait_for(timeout=10_000)
            waiting = page.locator('[data-testid="stChatMessage"]').nth(1)
            assert page.get_by_text("Draft, not yet checked").count() == 0
            page.screenshot(path=str(SCREENSHOTS / "chat-waiting.png"), full_page=True)
            list(busy)  # the other answer completes: the page's question gets the model
            busy = None

            page.get_by_text("Waited for the model behind 1 question.").wait_for(timeout=180_000)
            answer = waiting.inner_text().strip()
            assert answer, "the answer is empty"
            # A citation is a link to its source's anchor, in the source panel that the
            # answer's supporting span is highlighted in.
            citation = waiting.locator('a[href^="#source-"]').first
            citation.wait_for(timeout=10_000)
            anchor = str(citation.get_attribute("href"))[1:]
            assert page.locator(f"#{anchor}").count() == 1
            citation.click()
            page.wait_for_function(f"location.hash === '#{anchor}'", timeout=10_000)
            page.locator(f"#{anchor}").wait_for(state="visible", timeout=10_000)
            page.get_by_role("button", name="Get the file").first.wait_for(timeout=10_000)
            unverified = page.get_by_text("Show unverified")
            if unverified.count():  # sentences were dropped: reveal them, marked
                unverified.first.click()
                page.get_by_text("Unverified", exact=True).first.wait_for(timeout=10_000)
            # Streamlit scrolls inside its own container, so a full-page shot is one viewport:
            # a taller one shows the answer and the highlighted source together.
            page.set_viewport_size({"width": 1280, "height": 1600})
            waiting.evaluate("e => e.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(500)
            page.screenshot(path=str(SCREENSHOTS / "chat.png"), full_page=True)
            page.set_viewport_size({"width": 1280, "height": 1000})

            page.get_by_role("link", name="Documents").click()
            page.get_by_role("heading", name="Files").wait_for(timeout=30_000)
            page.locator('[data-testid="stDataFrame"]').last.wait_for(timeout=30_000)
            page.wait_for_timeout(1000)  # the data grid draws on a canvas after it mounts
            page.screenshot(path=str(SCREENSHOTS / "admin-documents.png"), full_page=True)
        finally:
            if busy is not None:
                busy.close()
            browser.close()

    assert (SCREENSHOTS / "chat-waiting.png").stat().st_size > 10_000
    assert (SCREENSHOTS / "chat.png").stat().st_size > 10_000
    assert (SCREENSHOTS / "admin-documents.png").stat().st_size > 10_000
    outside = sorted(
        url
        for url in requested
        if urlsplit(url).scheme not in ("data", "blob", "about")
        and urlsplit(url).hostname not in LOOPBACK
    )
    assert requested
    assert outside == [], f"the page reached beyond loopback: {outside}"
