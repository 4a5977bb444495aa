"""The Strategy contract: a strategy of the user's own, the one docs/training.md shows."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import daskml_scale
from tests.training.conftest import build_model

DOC = Path(__file__).resolve().parents[2] / "docs" / "training.md"


def docs_strategy():
    text = DOC.read_text()
    block = re.search(r"<!-- example-strategy:start -->\s*```python\n(.*?)```\s*<!-- example-strategy:end -->", text, re.S)
    assert block, "docs/training.md lost its example strategy"
    namespace: dict = {}
    exec(compile(block.group(1), str(DOC), "exec"), namespace)
    return namespace["AverageOncePerEpoch"]


def test_the_docs_example_is_short_and_uses_the_public_contract_only():
    code = re.search(r"<!-- example-strategy:start -->(.*?)<!-- example-strategy:end -->", DOC.read_text(), re.S).group(1)
    lines = [line for line in code.splitlines() if line.strip() and not line.strip().startswith("```")]
    assert len(lines) <= 32
    assert "_fit" not in code and "scratch" not in code  # nothing private


@pytest.mark.slow
def test_the_docs_strategy_trains_like_model_averaging(diamond_data, fitted_pre, client):
    strategy_cls = docs_strategy()
    n = len(fitted_pre.feature_names_)
    common = dict(preprocessor=fitted_pre, epochs=2, batch_size=128, client=client, verbose=0,
                  validation_data=diamond_data.val_ddf())
    mine = daskml_scale.fit(build_model(n), diamond_data.ddf(), strategy=strategy_cls(), **common)
    theirs = daskml_scale.fit(build_model(n), diamond_data.ddf(), strategy=daskml_scale.ModelAveraging(), **common)
    assert mine.history["rounds_so_far"] == [1.0, 2.0]  # its own per-fit state, its own logs
    assert mine.daskml_summary["strategy"] == "once-per-epoch"
    # the same algorithm as ModelAveraging(sync_every=None): the same model, to float tolerance
    np.testing.assert_allclose(mine.history["val_loss"], theirs.history["val_loss"], rtol=1e-4)


def test_a_strategy_must_implement_run_epoch():
    class Nothing(daskml_scale.Strategy):
        pass

    with pytest.raises(TypeError, match="run_epoch"):
        Nothing()


def test_fit_refuses_what_is_not_a_strategy(fitted_pre, diamond_data):
    with pytest.raises(daskml_scale.ArgumentError, match="Strategy"):
        daskml_scale.fit(build_model(len(fitted_pre.feature_names_)), diamond_data.train.head(100),
                         preprocessor=fitted_pre, strategy="averaging", client=object())
