"""The medfm demo (Gradio): prompt → radiograph and radiograph → report on the adapters listed in an index."""

from .app import build_demo, launch
from .index import AdapterEntry, load_index

__all__ = ["AdapterEntry", "build_demo", "launch", "load_index"]
