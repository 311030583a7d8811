"""TensorFlow model code: feature layers, towers, training, MatchModel, top-k retrieval, metrics. No Dagster here."""
