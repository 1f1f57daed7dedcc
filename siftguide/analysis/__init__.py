"""Analysis tools, apart from the training core: convergence comparison across runs (`compare`), patch
interrelation analysis (`analyze`), weight export (`export`)."""
