"""The papers' active-learning simulation: its setup, the run, the run spread over processes and
the report."""
