"""The leaderboard behind ``jobs/compare.py`` (docs/compare.md): every way the platform
makes one network from K trained ones, on the same held-out ensembles of one zoo, each
through its own code path. Not an engine method: the rows are the other methods' runs
and functions.

    config       the ``compare`` section and the methods it knows (no torch)
    experiment   plan, train, evaluate, log: the pipeline
"""
