"""Thin ``nn.Module`` wrappers over the fused ops."""
__all__: list[str] = []

from .sage_loss import SAGELoss, SAGELossConfig, SAGELossOutput  # noqa: E402

__all__ += ["SAGELoss", "SAGELossConfig", "SAGELossOutput"]
