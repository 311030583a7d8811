"""Offline evaluation against baselines, and the quality gate that decides what is published."""
