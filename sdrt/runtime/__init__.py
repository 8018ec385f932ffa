"""Production side of sdrt: engine directory -> images, with no torch."""
