"""``python -m sven.bench`` / ``sven-bench``: Sven against the baselines on the tasks of ``docs/tasks.md``.

* :mod:`sven.bench.tasks`: the tasks (one per file) and their registry;
* :mod:`sven.bench.optimizers`: one factory per optimizer name, with its grid;
* :mod:`sven.bench.runner`: runs and aggregates (task x optimizer x grid point x seed);
* :mod:`sven.bench.report`: ``results.json``, ``results.md`` and the plots;
* :mod:`sven.bench.cli`: the command line.

This package is imported by :mod:`sven.tasks`, so it imports nothing heavy here.
"""
