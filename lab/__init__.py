"""The lab: settings, database, workspace, registries, plugin SDK and the `lab` command."""

import warnings

__version__ = "0.1.0"

# TRL's configs default to gradient_checkpointing=True, which transformers 5 renamed activation_checkpointing and
# warns about on every config built (every `lab run`, every estimate on the Train page); the lab chooses it itself
# (lab.speed.choose_checkpointing, under whichever name the trainer takes), so the warning tells a user nothing
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing` is deprecated", category=FutureWarning)
