"""The method, no Ray: the authors' networks, REFILLED's losses, each stage as a small
class (`stages`: batch -> output and named losses), the training loops (`train`), the
evaluation and the batch-norm statistics it reads (`evaluate`), the teacher bank."""
