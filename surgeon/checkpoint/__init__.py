"""Reading and writing checkpoints: the safe unpickler, the allow-list it reads under, and atomic output files.

Nothing here runs code from a file; nothing here knows about rules, graphs or training.
"""
