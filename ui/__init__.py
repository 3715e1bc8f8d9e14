"""The Streamlit UI: a client of the core service (no qdrant, transformers or llama.cpp)."""
