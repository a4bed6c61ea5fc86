"""halo-ops benchmarks: ``python -m bench`` (see ``python -m bench --help``).

Run from a clone (``python -m bench``, or pytest from the repository root), this folder sits beside the
source tree of ``halo_ops``, which is not an importable package by itself: setup.py maps ``kernels/`` and
``integrations/`` into it. So importing ``bench`` moves the clone's root behind site-packages, before
anything imports ``halo_ops``: ``halo_ops`` is then the installed package (``bash .ci/setup-venv``
installs the built wheel), while ``bench`` and ``tests`` still import from the clone.
"""

import os
import sys


def _clone_root_after_site_packages() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kept = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != root]
    if len(kept) < len(sys.path):
        sys.path[:] = kept + [root]


_clone_root_after_site_packages()
