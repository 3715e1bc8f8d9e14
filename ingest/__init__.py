"""Ingestion: parse, chunk, embed and index the documents folder into the vector store."""
