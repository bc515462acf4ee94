"""Evaluation of the router and the experts."""
