"""The package list for setuptools (everything else is in ``pyproject.toml``).

``vlmsafe`` and ``probes``, plus the ``assets/`` folder as the package ``vlmsafe_assets`` (mapped in
``pyproject.toml``) with each of its subfolders, whose files are package data:
``[tool.setuptools.packages.find]`` cannot list a folder under another name.
"""

from setuptools import find_namespace_packages, find_packages, setup

ASSET_FOLDERS = [f"vlmsafe_assets.{name}" for name in find_namespace_packages(where="assets", exclude=["readme*"])]

CODE = find_packages(include=["vlmsafe", "vlmsafe.*", "probes", "probes.*"])

setup(packages=[*CODE, "vlmsafe_assets", *ASSET_FOLDERS])
