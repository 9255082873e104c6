"""Tracing and matching: the torch.fx graph of a model, its Conv blocks, their cost, rules and what they select.

Matching never changes the model.
"""
