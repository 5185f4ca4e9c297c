"""Label conventions the core shares with the runs that build batches.

``IGNORE_INDEX`` is the label of a token the loss ignores (a causal task's prompt, padding), as
Hugging Face models and ``torch.nn.CrossEntropyLoss`` expect: ``run/causal.py`` writes it into the
labels, and a method that reads batches (``eva``'s label mask) leaves those positions out.
"""

__all__ = ["IGNORE_INDEX"]

#: The label of a token the loss ignores (the prompt, padding).
IGNORE_INDEX = -100
