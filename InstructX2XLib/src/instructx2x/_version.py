"""The version of the whole repository, written here and nowhere else.

The library's, the training package's and the panels' metadata read it at build time
(``[tool.setuptools.dynamic]`` in each ``pyproject.toml``); ``instructx2x.__version__`` and
``instructx2x_train.__version__`` are this value. CITATION.cff repeats it, and
``Testing/test_versions.py`` fails when any of them differs.
"""

__version__ = "0.1.0"
