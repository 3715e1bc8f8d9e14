"""The UI's pages. ``ui/app.py`` hands each file to ``st.navigation``, which runs it as a script
(``__name__ == "__main__"``) with the signed-in user's client; imported, a page does nothing.

The folder is not called ``pages``: beside the entry script that name turns on Streamlit's older
pages-directory mode, which registers every file in it as a page of its own.
"""
