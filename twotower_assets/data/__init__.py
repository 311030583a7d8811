"""Data sources that produce click events with the production schema: the seeded synthetic generator and MovieLens 100K."""
