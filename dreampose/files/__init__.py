"""Bytes on disk, safely: weights read as safetensors or weights-only pickles (key clean-ups of the
authors' layouts included), atomic writes, and checks of user-given paths. The lowest layer above
``errors``/``settings``/``configs``."""
