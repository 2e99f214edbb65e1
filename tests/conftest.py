import os

import torch

# 2 shared cores: more than one thread stalls steps 20-50x when another process runs.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
