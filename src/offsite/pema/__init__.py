"""PEMA (Kim, Kim & Bak, NAACL 2024): offsite-tunable plug-in external memory adaptation.

The model owner never ships weights: it serves context representations and next-token
log-probabilities (:mod:`offsite.pema.service`, ``offsite serve``); the data owner builds an external
memory from them (:mod:`offsite.pema.memory`), trains a small low-rank module
(:mod:`offsite.pema.model`, :mod:`offsite.pema.train`) and mixes its distribution into the model's
while decoding (:mod:`offsite.pema.decode`, Gradual Unrolling). Every step takes a
:class:`~offsite.pema.backend.Backend`: :class:`~offsite.pema.backend.InProcessBackend` or the HTTP
:class:`~offsite.pema.client.ServiceBackend`. See ``docs/pema.md``.
"""

from offsite.pema.backend import Backend, InProcessBackend, LimitExceeded, Limits
from offsite.pema.decode import GUOptions, generate, gu_lambda, score_generation, score_webqs_pema
from offsite.pema.memory import Memory, build_memory
from offsite.pema.model import PEMA, SharedHead
from offsite.pema.train import PemaConfig, load_pema, save_pema, train_pema

__all__ = ["Backend", "InProcessBackend", "Limits", "LimitExceeded", "GUOptions", "generate", "gu_lambda",
           "score_generation", "score_webqs_pema", "Memory", "build_memory", "PEMA", "SharedHead",
           "PemaConfig", "train_pema", "save_pema", "load_pema"]
