"""Sphinx configuration of the torchrunx documentation (MyST Markdown pages).

Build: ``./dev hatch run docs`` (or ``sphinx-build -W --keep-going -b html docs docs/_build/html``).
Some pages run code while they are built (``_ext/trx_docs.py``): command-line help and the
log folder shown are produced by the installed packages, so they cannot go stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "torchrunx"
author = "the torchrunx authors"
copyright = "the torchrunx authors"

extensions = ["myst_parser", "sphinx.ext.autodoc", "trx_docs"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Single backticks in docstrings (`LaunchResult`) become links where a target exists.
default_role = "py:obj"
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
python_use_unqualified_type_names = True


html_theme = "alabaster"
html_title = "torchrunx"
html_theme_options = {"description": "Run a PyTorch function on every worker of one or many machines."}
