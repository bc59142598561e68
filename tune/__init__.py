"""Ray Tune sweeps, replicates and statistical comparison of run groups."""
