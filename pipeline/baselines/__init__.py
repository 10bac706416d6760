"""Plain baselines that make bench times the pipeline against: short scripts a reader can run alone."""
