"""sdrt.runtime: the production stage (numpy, no torch)."""
