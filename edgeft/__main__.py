"""`python -m edgeft` (also what torchrun / accelerate launch run)."""

from .cli import main

main()
