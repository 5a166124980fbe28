"""Wheels carry the site templates and mkdocs.yml inside the package, as ``atlas/_bundled/``.

In a checkout (and an editable install) atlas reads them from the top-level
``site_templates/`` and ``mkdocs.yml``; an installed wheel has no checkout to read, so
``build_py`` copies both into the package. Everything else is in pyproject.toml.
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


setup(cmdclass={"build_py": BuildPyWithTemplates})
