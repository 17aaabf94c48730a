"""Builds the ``torch.nn.Module`` of any exported conceptmoe graph (``graph.json``), one module per
block kind, with the TypeScript runtime's semantics; see ``graph.py`` for the layout and names."""
from .graph import KINDS, Block, Model, UnknownKind, build_model, load_graph, register
from .weights import load_weights, save_weights

__all__ = ["KINDS", "Block", "Model", "UnknownKind", "build_model", "load_graph", "register", "load_weights", "save_weights"]
