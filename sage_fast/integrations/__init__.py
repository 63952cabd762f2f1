"""Integrations with other training libraries. Each is imported on use, so that its library stays
optional: ``from sage_fast.integrations.hf_trainer import SAGEDistillTrainer`` (``sage-fast[train]``)."""
__all__: list[str] = []
