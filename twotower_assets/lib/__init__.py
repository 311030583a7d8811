"""Dagster glue shared by the definitions: keys and file layout, partitions, conditions, retries, resources."""
