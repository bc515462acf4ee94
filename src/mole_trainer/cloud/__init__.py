"""Cloud backends: thin layers that run mole_trainer.stages on remote machines (Modal)."""
