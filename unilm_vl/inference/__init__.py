"""Inference on trained models, outside the fairseq task registry: prompt reading, prompt datasets, generators and
decoding engines over a loaded checkpoint (one module per family).

Floor: beside ``models/``. These modules import ``data/``, ``modules/`` and :mod:`unilm_vl.checkpoint`, never
``tasks/``, ``criterions/`` or ``eval/``; tasks (``fairseq-generate``), the ``eval`` modules and the command-line
tools import them.
"""
