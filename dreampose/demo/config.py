"""Where the shipped demo model lies, importable without PyTorch (the command line names it in its
help before anything heavy is loaded). Its sampling and finetune settings are in
:mod:`dreampose.settings` (``DEMO_SAMPLING``, ``DEMO_FINETUNE_*``)."""
import os

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEMO_FILE = os.path.join(ASSET_DIR, "demo_dreampose.safetensors")
DEMO_WORLD_SEED = 0    # the world seed the demo model was trained with (its train split)
