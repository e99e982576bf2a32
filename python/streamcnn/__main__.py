"""``python -m streamcnn`` (also what ``torchrun -m streamcnn`` runs)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
