"""Tasks: datasets, prompt formatting and reward functions."""
