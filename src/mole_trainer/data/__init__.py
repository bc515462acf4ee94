"""Data stage: dataset formats and validation, synthetic experts, routing dataset, preprocessing."""
