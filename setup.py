"""Build configuration that pyproject.toml cannot express: the optional C extension of the data-plane hot path.

``dataplane._native`` is built when a C compiler, the Python headers and OpenSSL's libcrypto headers are present;
otherwise the build goes on without it (``optional=True``) and the pure-Python twin is used at run time.
``FIREZONE_BUILD_NATIVE=0`` skips it on purpose (a pure ``py3-none-any`` wheel, as ``make dist`` builds).
"""

from __future__ import annotations

import os

from setuptools import Extension, setup

native = Extension(
    "dataplane._native",
    sources=["dataplane/_native.c"],
    libraries=["crypto"],
    extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    optional=True,
)

setup(ext_modules=[] if os.environ.get("FIREZONE_BUILD_NATIVE") == "0" else [native])
