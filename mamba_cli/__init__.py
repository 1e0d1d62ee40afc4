"""The `mamba` command line. Modules here import torch only inside commands, so --help is fast."""
