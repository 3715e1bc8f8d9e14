"""The UI's pages, one module each, as functions that ``ui/app.py`` hands to ``st.navigation``.

(A folder named ``pages`` beside the entry script would switch Streamlit into its older
pages-directory mode, so the pages live here.)
"""
