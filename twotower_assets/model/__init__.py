"""TensorFlow model code: feature layers, towers, training, MatchModel, metrics. No Dagster here."""
