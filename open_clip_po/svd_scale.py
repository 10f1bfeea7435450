"""``python -m open_clip_po.svd_scale CKPT --t T``: checkpoint surgery on a trained linear head.

The command's entry; the code is ``open_clip_po.surgery`` (``surgery.cli`` for the command line).
"""
import sys

from .surgery.cli import main

if __name__ == "__main__":
    sys.exit(main())
