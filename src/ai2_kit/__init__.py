"""ai2-kit-checkpoint: resume long Python workflows where they stopped."""

__version__ = "0.1.0"
