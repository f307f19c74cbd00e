from setuptools import setup

setup(
    cffi_modules=[
        "c_ext/build_vring.py:ffi",
        "c_ext/build_discard.py:ffi",
    ],
)
