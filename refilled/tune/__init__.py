"""Everything that needs Ray: the trainable, the search, retrain tasks."""
