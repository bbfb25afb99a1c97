"""The commands: ``minitrain`` on the command line (``cli``) and each of its commands, one module
each (``run``, ``runs``, ``compare``, ``report`` and ``replay``, ``export``, ``predict``,
``lr_find``, ``config``, ``sweep``, ...), with ``start``, which turns a recipe and options into a
run directory and a Trainer. Commands use the engine, the recipe kit, the run records and the
first-party plugins; nothing below imports them."""
