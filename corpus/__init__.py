"""Corpus input/output shared by every stage: reading user corpora, the built-in demo, atomic files."""
