"""Studies: a grid of ``train.py`` runs over seeds (:mod:`~attn_flax.study.sweep`), and its report, mean ± std
per variant with Welch's interval against the baseline (:mod:`~attn_flax.study.report`, :mod:`~attn_flax.study.stats`).
``study.py`` at the top of the repository is the command line; docs/study.md is the study it runs."""
