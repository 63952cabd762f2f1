"""Loss-region analysis: where the student does worst, and where to synthesise examples."""
__all__: list[str] = []
