"""``python -m ekdaa`` (and ``torchrun -m ekdaa``) is the ``ekdaa`` command."""
import sys

from .cli import main

sys.exit(main())
