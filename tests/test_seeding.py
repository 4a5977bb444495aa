"""daskml_scale.seeded: builds under one seed are equal whatever other threads draw from
Python's ``random`` meanwhile (a Dask process's scheduler, client and ``dask.sizeof`` do)."""

from __future__ import annotations

import random
import threading

import numpy as np

import daskml_scale


def _build(draw_between: bool = False):
    import keras

    first = keras.layers.Dense(8, activation="relu")
    if draw_between:  # what another thread of the process may do between two layers
        random.random()
        random.sample(range(100), 10)
    model = keras.Sequential([keras.Input((5,)), first, keras.layers.Dropout(0.1), keras.layers.Dense(1)])
    return [np.asarray(w) for w in model.get_weights()]


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_a_draw_from_pythons_random_inside_the_block_moves_nothing():
    import keras

    with daskml_scale.seeded(0):
        quiet = _build()
    with daskml_scale.seeded(0):
        disturbed = _build(draw_between=True)
    assert _equal(quiet, disturbed)
    # the plain idiom in a quiet thread gives the same weights: seeded() only guards it
    keras.utils.set_random_seed(0)
    assert _equal(_build(), quiet)
    # and the plain idiom is what a draw in between moves (the reason seeded() exists)
    keras.utils.set_random_seed(0)
    assert not _equal(_build(draw_between=True), quiet)
    with daskml_scale.seeded(1):
        assert not _equal(_build(), quiet)


def test_builds_are_equal_while_another_thread_draws_and_the_generator_is_restored():
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            random.random()

    before = random.random
    t = threading.Thread(target=spin, daemon=True)
    t.start()
    try:
        builds = []
        for _ in range(3):
            with daskml_scale.seeded(7):
                builds.append(_build())
    finally:
        stop.set()
        t.join(10)
    assert all(_equal(b, builds[0]) for b in builds[1:])
    from keras.src.random import seed_generator

    assert seed_generator.python_random is random and random.random == before
