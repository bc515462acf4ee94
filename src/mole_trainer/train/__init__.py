"""Training stage: one loop shared by the expert LoRAs and the router."""
