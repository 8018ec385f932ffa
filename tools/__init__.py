"""Fixture and model makers, and one-off utilities (build time; they need the `export` extra)."""
