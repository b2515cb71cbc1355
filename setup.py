from setuptools import setup

# The C core is built by cffi in API mode; native/build.py declares it.
setup(cffi_modules=["native/build.py:ffibuilder"])
