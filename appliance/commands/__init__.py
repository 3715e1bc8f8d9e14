"""The CLI commands of the fine-tuning subsystem (``appliance finetune|dataset|models``). They
are application layer: they build what ``finetune`` is given (chat models, the golden-set
evaluation) and register themselves with ``appliance.cli`` through ``add_commands(sub)``."""
