"""Core services of ai2-kit (only checkpointing lives here in this distribution)."""
