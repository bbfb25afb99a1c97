"""The run records: what a run directory says about its run, read back (``rundir``), and how it is
shown (``curves``, ``formats``, and ``losses``: a training loss summed over the batch, per sample).
Below both the commands that read runs (``runs``, ``compare``, ``report``, ``sweep show``) and the
plugins that report on them (``viz``, ``mlflow``, ``console``); it stands on the engine alone."""
