"""The training / validation / test tables of each training date, and their checks."""
