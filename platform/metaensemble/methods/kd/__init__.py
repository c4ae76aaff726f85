"""Ensemble knowledge distillation (``method: kd``).

    config   the ``distill`` section and the ``kd`` method (torch-free, read by the registry)

The engine method, its loss and the teacher loading are ``methods.distill``, shared with
the methods that distil.
"""
