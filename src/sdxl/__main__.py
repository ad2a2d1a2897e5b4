"""`python -m sdxl ...` (and `torchrun --nproc_per_node N -m sdxl train ...`) runs the `sdxl` command."""

from .cli import main

if __name__ == "__main__":
    main()
