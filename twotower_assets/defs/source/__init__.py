"""Click events: the raw input of the graph."""
