"""Tools used around training: studies over seeds, reports, export, evaluation, benchmarks.

They import the run (`launch`), never the reverse.
"""
