"""offsite: offsite-tuning of large language models.

A model owner ships an *emulator* (a compressed copy of the model's middle blocks) plus
trainable *adapter* blocks; a data owner tunes the adapter on the emulator and returns only
the adapter; the owner plugs it into the full model. See README.md.
"""

__version__ = "0.1.0"
