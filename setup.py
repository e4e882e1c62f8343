"""Package discovery only (the metadata is in pyproject.toml): the presets' source is the repository's
top-level ``configs/``, which a wheel installs as ``lowmem_nablagfn/configs/`` — a directory mapping
pyproject's ``packages.find`` cannot express."""
from setuptools import find_namespace_packages, setup

PACKAGES = find_namespace_packages(include=["lowmem_nablagfn", "lowmem_nablagfn.*"], exclude=["*.__pycache__"])

setup(packages=PACKAGES + ["lowmem_nablagfn.configs"],
      package_dir={"lowmem_nablagfn.configs": "configs"})
