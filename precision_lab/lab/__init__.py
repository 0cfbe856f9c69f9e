"""The lab: runs experiments on top of the library, and never the other way round.

* :mod:`~precision_lab.lab.runner`: resumable, shardable task grids (part files, fingerprints);
* :mod:`~precision_lab.lab.fingerprint`: which code computed a sweep (library + compute modules, by syntax);
* :mod:`~precision_lab.lab.results`: tidy CSV and ``metadata.json``, written atomically;
* :mod:`~precision_lab.lab.plotting`: one figure style;
* :mod:`~precision_lab.lab.cli`: the ``precision-lab`` command.

The library (everything in :mod:`precision_lab` outside this package) imports nothing from here.
"""
