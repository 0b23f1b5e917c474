"""What every package shares: reading user corpora, the built-in demo, atomic files, the device choice."""
