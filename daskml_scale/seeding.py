"""Seeded model builds that the other threads of a Dask process cannot disturb.

Keras gives every initializer and every dropout layer made without an explicit seed
a seed drawn from Python's global ``random`` module at the moment the layer is made.
``keras.utils.set_random_seed(0)`` followed by ``build_model()`` is reproducible in a
quiet process, but a process that runs Dask is not quiet: a ``LocalCluster``'s
scheduler lives in it, the client's threads retry connections with random backoff,
``dask.sizeof`` samples long lists with ``random.sample``. A draw by one of them
between the seed and the last layer moves every later initializer, and two builds
under one seed come out different (seen as two "identical" fits that differ from
their first step, only when the cluster happened to be busy).

:func:`seeded` is ``keras.utils.set_random_seed(seed)`` for the code inside it, with
the seeds Keras draws for its layers coming from a generator of its own (seeded
alike, so a build under it equals the same build in a quiet process). The library
builds every model it makes under a seed this way (the templates of
:func:`~daskml_scale.fit_groups`, the trials of :func:`~daskml_scale.search`); user
code that builds two models it expects to be equal can do the same::

    with daskml_scale.seeded(0):
        model = build_model()
"""

from __future__ import annotations

import contextlib
import random
import threading
from typing import Iterator

__all__ = ["seeded"]

# one seeded build at a time in the process: two threads of one worker building trials
# at once would otherwise swap the generator under each other
_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Build models reproducibly under ``seed``, whatever other threads draw meanwhile.

    Parameters
    ----------
    seed : int
        Passed to ``keras.utils.set_random_seed`` (Python, NumPy and the backend), and
        the seed of the generator Keras draws its layers' default seeds from inside the
        block.

    Notes
    -----
    Builds inside the block run one at a time in the process (a lock), so keep the
    block to building the model; training inside it is correct but holds the lock.
    """
    import keras

    try:
        from keras.src.random import seed_generator as where
    except ImportError:  # pragma: no cover - a Keras without this module: the plain seed
        where = None
    with _LOCK:
        keras.utils.set_random_seed(int(seed))
        before = getattr(where, "python_random", None)
        if before is not None:
            where.python_random = random.Random(int(seed))  # what random.seed(seed) would draw
        try:
            yield
        finally:
            if before is not None:
                where.python_random = before
