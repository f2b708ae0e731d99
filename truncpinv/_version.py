"""The one version number of the distribution ``truncpinv-sven``.

``pyproject.toml`` reads it (``[tool.setuptools.dynamic]``), and both
``truncpinv.__version__`` and ``sven.__version__`` import it.
"""

__version__ = "0.3.0"
