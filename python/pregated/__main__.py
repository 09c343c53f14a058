"""`python -m pregated ...` is the `pregated` command."""
import sys

from .cli import main

sys.exit(main())
