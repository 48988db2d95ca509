# cffi_modules has no pyproject.toml spelling yet; everything else is there.
from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
