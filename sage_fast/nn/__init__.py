"""Thin ``nn.Module`` wrappers over the fused ops."""
__all__: list[str] = []
