"""Examples of the user's own problem: a target-function module and a dataset exporter (see README)."""
