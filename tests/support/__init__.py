"""What the tests share, as optuna.testing is for Optuna: a tiny config, processes run as a
user runs them, and the helpers of the tests that run real searches. Test modules import
from here, never from one another."""
