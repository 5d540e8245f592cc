"""The chaos suite: kill -9 under writes, concurrent writers, disk full / read-only at every write, fuzzed and hostile
uploads, and restart time on a 100k-image index. ``python -m chaos --help`` (from ``benchmarks/``), or ``make chaos``;
a short version runs in the default tests (tests/test_chaos_short.py). Each campaign writes results/chaos/<name>.json.
"""
