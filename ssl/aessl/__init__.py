"""aessl: semi-supervised training of anime aesthetic scorers (brackets 0-10).

The library behind the entry scripts in ssl/ (train.py, export.py, report.py, synth.py).
"""

import warnings

# Noise from the stack that says nothing to our users: timm's deprecated import paths used
# inside semilearn, and USB's CUDA GradScaler created on a CPU machine (we never use it).
warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\..*")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"semilearn\..*")
warnings.filterwarnings("ignore", message=r".*GradScaler is enabled, but CUDA is not available.*")
warnings.filterwarnings("ignore", message=r".*torch.cuda.amp.GradScaler.*deprecated.*")
