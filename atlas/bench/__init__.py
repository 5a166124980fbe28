"""`atlas bench`: stages timed against lower bounds measured in the same run."""
