"""Continual learning: tasks learned one after another, and the metrics of what is kept and what is lost."""
