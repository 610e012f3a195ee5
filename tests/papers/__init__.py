"""Paper-reproduction configs (configs/papers/) and their headline result."""
