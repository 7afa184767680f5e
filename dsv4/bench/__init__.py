"""Benchmarks: ``dsv4 bench`` (offline engine throughput) and ``dsv4 bench serving`` (any OpenAI endpoint).

Both print a card, a table, then one JSON line for scripts (nanochat's habit).
"""
