"""Workflows over the library: what ``ofa predictors``, ``ofa report`` and ``ofa demo`` run.

They drive the library (and, for reports, the real service through ``ofa serve`` and
``ofa-client`` in child processes) and return typed results; printing and exit codes
belong to :mod:`ofa.cli`.
"""
