"""SuperWeight ensembles (Teterwak et al., WACV 2024): members of different depths and
widths whose convs are composed from template banks shared under one parameter budget.

    model.py      the ``superweight`` architecture: banks, tiers, coefficients, members
    sharing.py    gradient similarity, the split, the join, unsharing (pure functions)
    method.py     ``method: superweight``: search, split and unsharing at the engine's
                  rebuild points, the summed loss, named predictions
    experiment.py jobs/superweight.py: the ensemble against independent ensembles of the
                  same architectures and of the same parameter count
"""
