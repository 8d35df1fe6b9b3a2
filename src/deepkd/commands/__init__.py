"""What the ``deepkd`` command does besides training: the demo, plots, summaries, checkpoint evaluation.

These modules use :mod:`deepkd.train` (and read run folders); nothing in ``deepkd.train`` imports them.
"""
