"""Figures: one module per experiment, ``plot(out_dir, fig_dir) -> list[Path]``, reading stored results only.

Figure code lives here, apart from the experiments' compute modules, so that editing a figure never
changes a sweep's fingerprint (:mod:`precision_lab.lab.fingerprint`): compute modules may not import
from this package.
"""
