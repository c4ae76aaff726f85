"""WeightFormer: meta-ensemble parameter learning (see methods/weightformer.md in the design).

    tokens     state dict <-> per-layer neuron rows, the token layout
    generator  WeightFormer and the MLP baseline (registered models)
    student    assembling, BN recompute, generating a student, drawing ensembles
    method     meta-training as an engine method
"""

from metaensemble.methods.weightformer.method import WeightFormerMethod

__all__ = ["WeightFormerMethod"]
