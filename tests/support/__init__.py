"""What the tests share, as optuna.testing is for Optuna: a tiny config, processes run as a
user runs them, the helpers of the tests that run real searches, CIFAR-100 files written in the
format of the real ones, and a script of a trial retried by Tune. Test modules import
from here, never from one another."""
