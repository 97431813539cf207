"""Training: typed configs, recipes of the seed systems, optimisers and schedules, losses, metrics, inference."""
