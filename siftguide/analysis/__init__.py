"""Analysis tools, apart from the training core. One concept per file:

* commands: ``compare`` (convergence across runs), ``analyze`` (patch interrelation of a ViT's attention),
  ``export`` (weights to timm), ``prompt`` (inference prompting), ``recipe`` (a study's recommended setting);
* ``runs`` (run discovery, grouping, labels), ``stats`` (curve statistics, paired differences, bootstrap),
  ``report`` (compare's table and verdict), ``plots`` (every figure), ``tables`` (Markdown/CSV);
* ``metrics`` (per-image attention measures), ``interrelation`` (their sums over an image set, spurious ranking),
  ``loading`` (checkpoints and nets), ``images`` (image folders and dataset splits);
* ``callback``: the training-time attention monitor.
"""
