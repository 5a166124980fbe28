"""Wheels carry the site templates, mkdocs.yml and data/ inside the package, as ``atlas/_bundled/``.

In a checkout (and an editable install) atlas reads them from the top-level
``site_templates/``, ``mkdocs.yml`` and ``data/`` (atlas/resources.py); an installed wheel has no checkout to read, so
``build_py`` copies all three into the package. Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithTemplates(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "atlas" / "_bundled"
        shutil.rmtree(dest, ignore_errors=True)        # a template removed since the last build stays out
        shutil.copytree("site_templates", dest / "site_templates")
        shutil.copy2("mkdocs.yml", dest / "mkdocs.yml")
        shutil.copytree("data", dest / "data")


setup(cmdclass={"build_py": BuildPyWithTemplates})
