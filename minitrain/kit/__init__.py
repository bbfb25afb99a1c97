"""The recipe kit: what recipes build runs from. The config base and ``Components`` (``recipe``),
CIFAR-10 and the loaders that keep it on the device (``data``), networks (``nets``), the Muon
optimizer (``muon``), schedules, augmentation and test-time augmentation (``augment``),
fine-tuning helpers (``finetune``) and a model's summary (``summary``). It stands on the engine
alone."""
