"""`python -m factorconv ...`, so that `accelerate launch -m factorconv ...` works."""

from .cli import main

main()
