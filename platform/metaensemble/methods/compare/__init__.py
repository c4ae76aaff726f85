"""The ``compare`` config section of ``jobs/compare.py``, the leaderboard (docs/compare.md).

Not an engine method and no pipeline of its own here: the leaderboard is a composition of
every method (``metaensemble.leaderboard``, beside ``sweep``), and this folder only
declares the section its configs carry, so that the registry knows it.

    config       the ``compare`` section and the methods it knows (no torch)
"""
