"""The Streamlit UI: a client of the core service; never imports qdrant, transformers or llama.cpp."""
