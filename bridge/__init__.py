"""Codeplan bridge: the API the coding tools talk to."""
