"""The PyTorch module of each built-in block kind, one file per kind (as ``src/blocks/``)."""
from . import combinators, embedding, linear, norms, rotary, mlp, moe, attention, mla, chunk, dechunk, concept_stage  # noqa: F401
