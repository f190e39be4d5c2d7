"""Looking inside trained models (nearest vocabulary tokens of image features, ...)."""
