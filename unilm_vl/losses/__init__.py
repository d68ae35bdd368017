"""Pure loss maths: tensors in, tensors out, rank and world size passed in, no fairseq import.

One module per family; the registered criteria (:mod:`unilm_vl.criterions`) are thin adapters over these:

- :mod:`.precision`: ``full_precision`` (autocast off inside a loss);
- :mod:`.distributed`: the rank/world helper, the feature gathers and all-reduces, and the table of the
  ``--gather-gradient`` values every criterion shares;
- :mod:`.clip`: CLIP's symmetric InfoNCE (open_clip ``ClipLoss`` semantics) and in-batch accuracies;
- :mod:`.rocket`: clip-rocket's CL2L and the SiamLIP / BYOLIP / BarLIP / SwALIP terms;
- :mod:`.negatives`: NegCLIP and FSC-CLIP hard-negative losses;
- :mod:`.cosmos`: COSMOS's multi-view CLIP and distillation terms;
- :mod:`.cosa`: COSA's ITC / ITM / token losses and its objective strings;
- :mod:`.kosmos2`: the masked token NLL of the Kosmos-2 language model;
- :mod:`.ema`: EMA (momentum / teacher) updates and their schedules.
"""
