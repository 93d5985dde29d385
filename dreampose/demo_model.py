"""``python -m dreampose.demo_model base|package``: the two steps of the demo model's recipe that are
not ``python -m dreampose train`` (``scripts/train_demo_model.sh``, which the shipped model's metadata
stores verbatim, calls them by this name), and ``decoder``, a candidate step between ``train`` and
``package`` not in the recipe yet. The code is :mod:`dreampose.demo.build`."""
import sys

from .demo.build import main

if __name__ == "__main__":
    sys.exit(main())
