"""CLI commands. Each module exposes ``register(app)``; heavy imports stay inside the commands."""
