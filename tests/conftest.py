import os

# Tests never touch the network: models are built from configs, data is local or generated.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Test models are tiny: one thread is fastest, and it keeps two test processes (DDP) or a busy
# machine from oversubscribing the cores, which slows OpenMP-threaded kernels by orders of magnitude.
torch.set_num_threads(1)
