"""The chat page with a recorded answer stream (see ``tests/ui/recorded.py``), for AppTest."""

import streamlit as st

from tests.ui.recorded import CLIENT, RECORDING, RecordedAskClient
from ui.views import chat

chat.render(RecordedAskClient(st.session_state[CLIENT], st.session_state[RECORDING]))
