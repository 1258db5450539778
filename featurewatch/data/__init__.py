"""Bundled data: the corpus, prompt sets and labelled transcripts (JSONL). No code."""
