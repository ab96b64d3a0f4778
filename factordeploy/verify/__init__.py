"""verify/: export fidelity (polygraphy) and task quality against the original model."""
