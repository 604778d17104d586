"""Thin click commands, one per DVC stage; all logic is in the pipeline package."""
