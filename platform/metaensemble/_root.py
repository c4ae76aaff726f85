"""A Ray worker setup hook (imports nothing from the library).

A worker of a job submitted with ``--working-dir`` starts in that directory's copy on its
node; Ray Train moves it elsewhere before running anything. Pinning the start directory
here, before the library is imported, makes ``config.REPO_ROOT`` (where relative paths
resolve) the job's working directory on every worker.
"""

import os


def pin_working_dir() -> None:
    os.environ["METAENSEMBLE_ROOT"] = os.getcwd()
