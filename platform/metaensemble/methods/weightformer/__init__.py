"""WeightFormer: meta-ensemble parameter learning (docs/weightformer.md).

    config      the ``meta`` section (torch-free, read by the method registry)
    tokens      state dict <-> per-layer neuron rows, the token layout
    generator   WeightFormer and the MLP baseline (registered models)
    student     assembling, generating a student (BN recomputed: models.batchnorm), drawing ensembles
    align       permutation alignment of teachers to a reference
    plan        the checks before any work; the zoo split into sides (job and sweep alike)
    method      meta-training as an engine method
    use         a trained generator's student for a given ensemble; the data it is scored on
    experiment  the main job: zoo, runs side by side, the held-out evaluation
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazily, so that the method registry can import weightformer.config without importing torch.
    if name == "WeightFormerMethod":
        from metaensemble.methods.weightformer.method import WeightFormerMethod

        return WeightFormerMethod
    raise AttributeError(name)
