"""The OOD study: how well the Mahalanobis detector (:mod:`facerec.ood`) separates faces from
non-faces, corruptions and attacks, on inputs made as the service sees them.

- :mod:`.families`: the input families (corruptions, controls, attacks, non-faces) and the
  service's face location;
- :mod:`.splits`: the protocol's validation and test splits, built once and cached;
- :mod:`.scoring`: the combiner and threshold fitted on validation, every test set reported, the
  adaptive attack against a fitted detector;
- :mod:`.options` and :mod:`.driver`: what its two callers share, ``facerec fit-ood`` (fits the
  shipped detector) and ``benchmarks/ood_eval.py`` (compares variants).

The study lives with evaluation, not inside the component it studies: ``facerec.ood`` is the
detector the service loads, and imports nothing from here.
"""
