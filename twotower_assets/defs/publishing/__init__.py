"""What a model that passed the quality gate publishes."""
