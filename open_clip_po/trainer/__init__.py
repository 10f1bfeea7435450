"""open_clip's own trainer (``open_clip_train.main``) running preference optimisation.

Everything here exists only to run that trainer; the library (losses, data, reference, criterion, head, averaging,
checkpoint, surgery, ref_cache, eval, towers) never imports it.

- ``seam``: the one module that patches open_clip, for one run, restoring it on exit; ``main``
- ``cli``: parsing and checking the ``--po-*`` flags (``open_clip_po.flags``) with open_clip's; ``options``: which
  open_clip options work with PO
- ``model_setup``: policy and reference as a run builds them; ``epoch``: one PO epoch; ``hooks``: what happens
  around steps and epochs; ``evaluator``: epoch-end evaluation; ``seeding``: seeded open_clip shuffles; ``amp``:
  steps the fp16 GradScaler skipped
"""
