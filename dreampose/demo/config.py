"""Facts about the shipped demo model, importable without PyTorch (the command line builds its parser
from them before anything heavy is loaded)."""
import os

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEMO_FILE = os.path.join(ASSET_DIR, "demo_dreampose.safetensors")
DEMO_HEIGHT, DEMO_WIDTH = 192, 128   # the size the demo model was trained at (latent 24×16)
# the subject finetune the demo (and the synthetic ablation table) runs on the key frame: the paper's
# second phase, short, at a learning rate sized for a model trained at 5e-4
DEMO_FINETUNE_STEPS, DEMO_VAE_FINETUNE_STEPS, DEMO_FINETUNE_LR = 100, 100, 1e-4
