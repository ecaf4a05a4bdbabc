"""Build script for the optional C accelerator ``fp4fmt._native``.

Everything else lives in pyproject.toml. The accelerator is a speed path only: ``fp4fmt`` works without it
(pure numpy reference), and the tests prove both produce identical bytes.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fp4fmt._native",
            sources=["fp4fmt/_native.c"],
            extra_compile_args=["-O3", "-std=c11", "-fno-fast-math", "-ffp-contract=off"],
        )
    ]
)
