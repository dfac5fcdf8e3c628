"""Experiment launchers and configs."""
