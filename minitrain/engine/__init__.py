"""The engine: the loop and what it stands on. It imports nothing of the recipe kit, the
commands or the plugins.

What plugins may use of it (the plugin surface):

* ``surface``: ``PluginConfig``, the ``RunView`` / ``TrainerView`` protocols (what a plugin may
  read and call on the trainer) and ``Shared`` (what the step's plugins share);
* ``hookspecs``: the ``hookimpl`` / ``hookspec`` markers and every hook, documented where declared;
* ``events`` (the event catalogue), ``state`` (progress and typed stop reasons), ``errors``;
* ``checkpointing`` (the checkpoint format), ``distributed`` (ranks), ``device`` (batches, host
  copies), ``files`` (atomic writes, one-line errors), ``metrics``, ``lock``.

Internal to the engine: ``trainer`` (the loop), ``dispatch`` (resolved hook calls), ``registry``
(plugin discovery and registration) and ``default_protocol`` (the default training steps).
"""

__version__ = "0.1.0"
