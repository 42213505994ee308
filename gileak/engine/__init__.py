"""The vectorized reconstruction loop shared by every gradient-matching attack."""

from gileak.engine.matching import MatchingConfig, gradient_matching, total_variation

__all__ = ["MatchingConfig", "gradient_matching", "total_variation"]
