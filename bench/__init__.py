"""The benchmark scripts (run each as `python bench/NAME.py`; docs/results.md). A package so that
the tests import them (`from bench import paper`); what the scripts share lives in
:mod:`offsite.experiment.benchmark`, which they import like any other module.
"""
