"""Pure mixing math: recipes to weights, the guard, and the per-step mixing of log-probabilities."""
