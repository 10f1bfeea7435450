"""``torchrun -m open_clip_po.main --po-loss dpo [open_clip flags]``: open_clip's own trainer with PO.

The command's entry; the trainer itself is ``open_clip_po.trainer`` (``seam`` patches open_clip's trainer for one
run and restores it).
"""
import sys

from .trainer.seam import main

if __name__ == "__main__":
    sys.exit(main())
