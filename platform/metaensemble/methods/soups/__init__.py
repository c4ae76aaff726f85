"""Model soups (Wortsman et al. 2022): one network from the weights of K networks of one
architecture fine-tuned from one parent (docs/soups.md). Not an engine method: pure
functions any job calls.

    ingredients  the checks before any work (one architecture, one parent); the uniform average
    soup         Soup; uniform_soup, greedy_soup, best_member; bake (weights -> BN-recomputed network), score
    learned      learned_soup: per-layer mixing coefficients fit on val

    from metaensemble.methods.soups import greedy_soup
    soup = greedy_soup([t.state_dict() for t in teachers], teachers[0], bn_loader, val_loader)
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ingredients": ("check_ingredients", "average"),
    "soup": ("Soup", "Score", "Offer", "bake", "score", "uniform_soup", "greedy_soup", "best_member"),
    "learned": ("learned_soup",),
}


def __getattr__(name: str) -> Any:
    # Lazily, so that importing the package imports no torch.
    if name in _EXPORTS["ingredients"]:
        from metaensemble.methods.soups import ingredients as module
    elif name in _EXPORTS["soup"]:
        from metaensemble.methods.soups import soup as module
    elif name in _EXPORTS["learned"]:
        from metaensemble.methods.soups import learned as module
    else:
        raise AttributeError(name)
    return getattr(module, name)


__all__ = sorted(n for names in _EXPORTS.values() for n in names)
