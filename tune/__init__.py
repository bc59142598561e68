"""Ray Tune sweeps, replicates and statistical comparison of run groups (issue 6; not built yet)."""
