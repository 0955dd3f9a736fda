"""Collaborative tasks: one module per task, behind one interface."""
