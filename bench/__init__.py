"""The benchmarks: scripts run from the repository root as ``python -m bench.NAME`` (e.g.
``python -m bench.race``, ``python -m bench.cpu_suite``), so that they import each other
(``bench.cpu_suite.machine``, ``bench.output.write_results``) as ordinary modules."""
