"""Ray Data offline inference: `map_batches(RayPredictor, ...)` over a few thousand rows gives exactly the eager
module's outputs, in order, with the id column passed through."""

import numpy as np
import pytest
import torch

from torchopt.serve import RayPredictor, predictor_options

pytestmark = pytest.mark.slow

ROWS = 3000


def test_map_batches_gives_the_eager_outputs_in_order(ray_serve, artifact, mlp):
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in dataset order
    context.enable_progress_bars = False
    xs = np.random.default_rng(5).standard_normal((ROWS, 16)).astype(np.float32)
    ds = ray.data.from_items([{"id": i, "x": xs[i]} for i in range(ROWS)])
    # batch_size 100 is above the profile's max (32): the predictor runs it in chunks.
    options = predictor_options(artifact, batch_size=100, concurrency=2, num_cpus=0.5)
    rows = ds.map_batches(RayPredictor, **options).take_all()

    assert len(rows) == ROWS
    assert [r["id"] for r in rows] == list(range(ROWS))
    with torch.no_grad():
        expected = mlp(torch.from_numpy(xs)).numpy()
    got = np.stack([r["output"] for r in rows])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
