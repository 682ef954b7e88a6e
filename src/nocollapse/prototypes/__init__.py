"""Prototypes: one interface (:class:`PrototypeSet`) and its three kinds, learned, decoupled
(an online-EM mixture) and fixed."""

from .base import PrototypeSet, PrototypeSnapshot
from .decoupled import DecoupledPrototypes
from .fixed import FixedPrototypes, orthonormal_prototypes, rademacher_codebook
from .learned import LearnedPrototypes, PrototypeLayer
from .space import SPACES, EmbeddingSpace

__all__ = ["SPACES", "DecoupledPrototypes", "EmbeddingSpace", "FixedPrototypes", "LearnedPrototypes", "PrototypeLayer", "PrototypeSet",
           "PrototypeSnapshot", "orthonormal_prototypes", "rademacher_codebook"]
