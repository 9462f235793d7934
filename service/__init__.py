"""Codeplan service: accounts, plans, keys, the usage ledger and its quota windows."""
