"""Data sets, class splits, on-device batches and augmentation."""
