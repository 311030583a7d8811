"""Tests of the BigQuery warehouse against a real bqemulator process."""
