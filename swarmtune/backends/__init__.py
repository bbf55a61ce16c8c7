"""Evaluation backends behind one protocol, found by name (like tasks/)."""
