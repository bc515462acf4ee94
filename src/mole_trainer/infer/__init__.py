"""Inference: router scoring, generation, stacked (routed) inference."""
