"""`python -m edgeft` (also what torchrun / accelerate launch run)."""

from edgeft.cli import main

main()
