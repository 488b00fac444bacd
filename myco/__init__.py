"""mycoSwarm: the pieces both processes share (CLI, errors, serving)."""
