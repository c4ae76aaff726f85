"""Generate one student for a given ensemble with a meta-trained WeightFormer generator.

    python jobs/generate.py --generator 1 --teachers 37 31 2 4  # zoo versions of teacher.digits.convnet
    python jobs/generate.py --generator 2 --teachers models:/teacher.digits.convnet/40 runs:/<id>/model
    python jobs/generate.py --generator 1 --teachers 37 31 --no-register

The generator is a version of the registered ``weightformer.<dataset>.<arch>`` (default:
its newest) or a ``models:/`` / ``runs:/`` URI. Teachers are zoo versions of
``teacher.<dataset>.<arch>`` or checkpoint URIs; any number from 2 to the generator's
maximum, the first is the anchor. The student is scored on the test split (BatchNorm
statistics recomputed as in the meta-train table) and registered as
``student.<dataset>.<arch>.weightformer``, tagged with its teachers and the generator.
"""

from __future__ import annotations

import _library  # noqa: F401  # isort: skip - this checkout's library first (jobs/_library.py)
import argparse


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generator", default=None,
                   help="version of weightformer.<dataset>.<arch>, or a models:/ or runs:/ URI (default: newest)")
    p.add_argument("--teachers", nargs="+", required=True, help="zoo versions or checkpoint URIs (2..max_teachers)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--arch", default="convnet", help="the student architecture (names the registered models)")
    p.add_argument("--no-register", action="store_true", help="score the student but register nothing")
    args = p.parse_args()
    from metaensemble.cli import work_done
    from metaensemble.methods.weightformer.use import (
        describe,
        generate,
        resolve_generator,
        resolve_teachers,
    )

    generator = resolve_generator(args.generator, args.dataset, args.arch)
    teachers = resolve_teachers(args.teachers, args.dataset, args.arch)
    out = generate(generator, teachers, register=not args.no_register)
    work_done()
    print(f"generator {generator}")
    print(describe(out, teachers))
    return 0


if __name__ == "__main__":
    from metaensemble.cli import run_job

    run_job(main)
