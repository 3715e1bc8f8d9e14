"""The UI is a thin client: importing and running it loads no store, model or ingest code."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.ui.conftest import ADMIN, APP, ROOT, Core

FORBIDDEN = (
    "qdrant_client",
    "qdrant_edge",
    "transformers",
    "torch",
    "sentence_transformers",
    "llama_cpp",
    "ingest",
)

# Imports every ui module but the entry script, then runs the entry script through every page
# as an admin (sign-in, chat, documents, users, models), and reports what got imported.
PROBE = textwrap.dedent(
    """
    import json, pkgutil, sys
    import ui
    for module in pkgutil.walk_packages(ui.__path__, "ui."):
        if module.name != "ui.app":
            __import__(module.name)
    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(sys.argv[1], default_timeout=30).run()
    at.text_input(key="login.username").input(sys.argv[2])
    at.text_input(key="login.password").input(sys.argv[3])
    at.button[0].click().run()
    titles = [t.value for t in at.title]
    for page in ("views/documents.py", "views/users.py", "views/models.py"):
        at.switch_page(page).run()
        titles += [t.value for t in at.title]
    errors = [str(e.value) for e in list(at.exception) + list(at.error)]
    forbidden = tuple(sys.argv[4].split())
    loaded = sorted(
        name for name in sys.modules
        if name in forbidden or name.startswith(tuple(f + "." for f in forbidden))
    )
    print(json.dumps({"titles": titles, "errors": errors, "loaded": loaded}))
    """
)


def test_ui_loads_no_store_model_or_ingest_code(ui_env: Core) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(APP), *ADMIN, " ".join(FORBIDDEN)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["titles"] == ["Chat", "Documents", "Users", "Models"], report
    assert report["errors"] == []
    assert report["loaded"] == []
