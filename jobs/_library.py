"""Imported first by every job: the library of the checkout this job belongs to
(``platform/`` next to ``jobs/``) goes ahead of any installed copy on ``sys.path``.

So ``ray job submit --working-dir . -- python jobs/x.py`` runs the code that was
submitted, not whatever is installed on the cluster's nodes; the engine ships the same
copy to every Ray worker (``engine.trainer.ensure_ray``).
"""

import sys
from pathlib import Path

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
if (PLATFORM / "metaensemble" / "__init__.py").is_file():
    if "metaensemble" in sys.modules and not sys.modules["metaensemble"].__file__.startswith(str(PLATFORM)):
        raise ImportError(f"metaensemble was imported from {sys.modules['metaensemble'].__file__} before this "
                          f"job could put {PLATFORM} first")
    if str(PLATFORM) not in sys.path:
        sys.path.insert(0, str(PLATFORM))
