"""Many models: one Keras model per group of rows (per store, product, machine, aircraft).

* :func:`fit_groups` trains them on the cluster, a worker's groups together as one
  compiled program where the architecture allows (:mod:`~daskml_scale.groups.spec`
  says which), and returns :class:`GroupModels`.
* ``save_bundle(group_models, preprocessor, url)`` writes them as one file (the
  architecture once, the weights of every group stacked, the group index, the
  fallback model); ``load_bundle`` reads it back as a :class:`GroupBundle`, which
  ``predict``, ``predict_files`` and ``serve`` route row by row to each row's group.

``docs/many_models.md`` has the guide and the measured figures.
"""

from __future__ import annotations

from daskml_scale.groups.bundle import GroupBundle, group_bundle_bytes
from daskml_scale.groups.fit import fit_groups
from daskml_scale.groups.models import GroupModels

__all__ = ["fit_groups", "GroupModels", "GroupBundle", "group_bundle_bytes"]
