"""Workflows over the library: what ``ofa predictors``, ``ofa report``, ``ofa demo``, ``ofa finetune``,
``ofa import-reference``, ``ofa profile`` and ``ofa int8-accuracy`` run (and the from-scratch baselines,
:mod:`.scratch`).

They drive the library (and, for reports, the real service through ``ofa serve`` and
``ofa-client`` in child processes) and return typed results; printing and exit codes
belong to :mod:`ofa.cli`.
"""
