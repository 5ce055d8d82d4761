"""Builds the optional native kernel; capmerge falls back to its torch path when it cannot be compiled."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "capmerge._native",
            sources=["capmerge/_native.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-strict-aliasing"],
            optional=True,
        )
    ]
)
