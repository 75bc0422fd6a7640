"""``python -m lrp_grad ...`` runs the ``lrp-grad`` command line."""
import sys

from .app.cli import main

sys.exit(main())
