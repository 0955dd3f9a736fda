"""Trainers: one readable file per algorithm; `main.py` dispatches on `config.trainer`."""
