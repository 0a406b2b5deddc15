"""Sphinx configuration of vmtransport's guide and API reference.

Built by the test command (scripts/test.sh) with warnings as errors:
``.venv/bin/python -m sphinx -W --keep-going -b html docs/site BUILD``.
The pages are Markdown (MyST); the API reference comes from the docstrings (autodoc).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(__file__, "..", "..", "..")))

project = "vmtransport"
author = "the vmtransport authors"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Types the reference names but does not document itself (trio's, pluggy's, the
# standard library's, and private helpers behind public signatures) are not linked.
nitpicky = False
suppress_warnings = ["myst.xref_missing"]
html_theme = "alabaster"
html_title = "vmtransport"
