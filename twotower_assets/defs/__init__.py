"""Dagster definitions, one module per step of the graph; ``twotower_assets.definitions`` joins them."""
