"""The web console (``/console``): pages, templates and vendored static files."""

from pipeline.console.routes import install_console

__all__ = ["install_console"]
