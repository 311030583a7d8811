"""Data sources: the synthetic click-event generator and the split rules."""
