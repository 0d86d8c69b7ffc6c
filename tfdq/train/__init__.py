"""tfdq's training command, ``tfdq-train`` (also ``python -m tfdq.train``).

Its data sets, plots and flags need the ``train`` extra (``pip install "tfdq[train]"``);
``import tfdq`` never imports this package.
"""
