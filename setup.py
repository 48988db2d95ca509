# cffi_modules has no pyproject.toml spelling yet; everything else is there.
from setuptools import Extension, setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"],
      # The Python turn of a sync fault, in C (native/faultpy.c): it calls
      # the protector through the CPython API, which cffi cannot declare.
      ext_modules=[Extension("wp._faultpy", ["native/faultpy.c"], include_dirs=["native"],
                             extra_compile_args=["-O2", "-Wall", "-std=gnu11"])])
