"""Admin / Documents: what is indexed, what failed and why, progress, and uploads."""

from __future__ import annotations

import base64
from typing import Any

import streamlit as st

from appliance.api import ServiceClient
from appliance.core.errors import ServiceError
from ui import session
from ui.formatting import collection_label, when
from ui.safe import md

# What the service parses (ingest.parsers.supported_suffixes; the UI may not import ingest).
# No bare strings at module level: Streamlit's "magic" would show them on the page.
SUFFIXES = ("pdf", "docx", "md", "markdown", "txt", "text", "html", "htm")
TOP_LEVEL = ""
UPLOADS = "documents.uploads"  # a counter in the uploader's key: a new key empties it


def render(api: ServiceClient) -> None:
    st.title("Documents")
    session.show_flash()
    auto = st.toggle("Refresh every 3 seconds", key="documents.auto")
    st.fragment(run_every=3.0 if auto else None)(_status)(api)
    _upload(api)


def _status(api: ServiceClient) -> None:
    if st.button("Refresh", icon=":material/refresh:"):
        pass  # the click itself reruns this part
    try:
        info = api.call("GET", "/admin/documents")
    except ServiceError as exc:
        session.show_error(exc)
        return
    files: list[dict[str, Any]] = info.get("files") or []
    failed: list[dict[str, Any]] = info.get("failed") or []
    in_progress: list[str] = info.get("in_progress") or []
    stuck: list[dict[str, Any]] = info.get("stuck") or []
    documents, chunks, running, failures = st.columns(4)
    documents.metric("Documents", info.get("documents", 0))
    chunks.metric("Passages", info.get("chunks", 0))
    running.metric("Being indexed", len(in_progress))
    failures.metric("Failed", len(failed))

    watcher = info.get("watcher") or {}
    if watcher.get("state") not in (None, "ok"):
        reason = watcher.get("reason") or "no reason given"
        st.warning(md(f"Folder watcher is {watcher.get('state')}: {reason}"))
    if info.get("held_deletions"):
        st.warning(
            md(
                f"Deletion of {info['held_deletions']} documents is on hold: many files "
                "disappeared at once. Check the documents folder, then confirm with "
                "appliance ingest --confirm-deletions."
            )
        )
    if info.get("switching_from"):
        st.info("A new embedding model is being applied: search uses the old index until done.")
    if in_progress:
        st.info(md(f"Indexing {len(in_progress)} file(s). Refresh to see progress."))
        with st.expander("Files being indexed"):
            st.dataframe([{"File": path} for path in in_progress], hide_index=True)
    if stuck:
        st.warning(md(f"{len(stuck)} file(s) seem stuck."))
        st.dataframe(
            [
                {"File": s["path"], "State": s["state"], "For (seconds)": s["seconds"]}
                for s in stuck
            ],
            hide_index=True,
        )

    st.subheader("Failures")
    if failed:
        st.dataframe(
            [{"File": f["path"], "Reason": f.get("reason") or "failed"} for f in failed],
            hide_index=True,
            width="stretch",
        )
    else:
        st.caption("No failures.")

    st.subheader("Files")
    if not files:
        st.caption("Nothing is indexed yet. Add files below or put them in the documents folder.")
        return
    st.dataframe(
        [
            {
                "File": f["path"],
                "State": f["state"],
                "Pages": f.get("pages"),
                "Passages": f.get("chunks"),
                "Indexed": when(f.get("indexed_at")),
                "Size (KB)": round((f.get("size") or 0) / 1024, 1),
                "Reason": f.get("reason") or "",
            }
            for f in files
        ],
        hide_index=True,
        width="stretch",
    )


def _upload(api: ServiceClient) -> None:
    st.subheader("Add files")
    try:
        collections: list[str] = api.call("GET", "/admin/groups").get("collections") or []
    except ServiceError as exc:
        session.show_error(exc)
        return
    folder = st.selectbox(
        "Collection (a subfolder; only groups granted it can read it)",
        [TOP_LEVEL, *collections],
        format_func=collection_label,
        accept_new_options=True,
        key="documents.folder",
    )
    count = st.session_state.setdefault(UPLOADS, 0)
    uploads = st.file_uploader(
        "Files (" + ", ".join(f".{s}" for s in SUFFIXES) + ")",
        type=list(SUFFIXES),
        accept_multiple_files=True,
        key=f"documents.files.{count}",
    )
    if not st.button("Add to the documents folder", type="primary", disabled=not uploads):
        return
    saved: list[str] = []
    refused = 0
    for upload in uploads or []:
        body = {
            "name": upload.name,
            "folder": (folder or "").strip().strip("/"),
            "content_b64": base64.b64encode(upload.getvalue()).decode("ascii"),
        }
        try:
            reply = api.call("POST", "/admin/upload", body)
        except ServiceError as exc:
            session.show_error(exc)
            refused += 1
            continue
        saved.append(str(reply.get("path", upload.name)))
    if not saved:
        return
    message = f"Added {', '.join(saved)}. They are indexed in the background."
    if refused:
        st.success(md(message))  # keep the errors above in view
        return
    st.session_state[UPLOADS] = count + 1
    session.flash(message)
    st.rerun()


if __name__ == "__main__":
    render(session.api())
