"""Ray Data scale-out: a local 2-CPU Ray over a multi-file Parquet dataset must give the
single-process result. Select with ``pytest -m ray``; skipped without Ray Data."""

from __future__ import annotations

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from cppo_native.arrow import mask_table, sample_table  # noqa: E402
from cppo_native.ray import mask_dataset  # noqa: E402

pytestmark = pytest.mark.ray

KNOBS = dict(delta=0.15, delta_b=0.02, w_min=0.8)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()


def _write_dataset(tmp_path, table, files):
    d = tmp_path / "rollouts"
    d.mkdir()
    bounds = np.linspace(0, table.num_rows, files + 1).astype(int)
    for i in range(files):
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), d / f"part-{i:03d}.parquet",
                       row_group_size=100)
    return d


def _collect(ds):
    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables).sort_by("uid")


def test_ray_matches_single_process(tmp_path, local_ray):
    table = sample_table(1200, 96, seed=3, drift=0.05)
    # A per-token response mask and a given divergence exercise every input path.
    rng = np.random.default_rng(0)
    offsets = table.column("log_probs").combine_chunks().offsets.to_numpy()
    n = int(offsets[-1])
    valid = pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.random(n) > 0.1))
    table = table.append_column("response_mask", valid)
    path = _write_dataset(tmp_path, table, files=4)

    expected = mask_table(pq.read_table(path).sort_by("uid"), **KNOBS)
    ds = ray.data.read_parquet(str(path))
    got = _collect(mask_dataset(ds, batch_size=128, **KNOBS))
    assert got.num_rows == table.num_rows
    assert got.schema.equals(expected.schema)
    for name in ("cppo_mask", "cppo_reason", "cppo_threshold", "cppo_row_budget"):
        assert got.column(name).combine_chunks().equals(expected.column(name).combine_chunks()), name
    # The masks are not trivial.
    reasons = np.concatenate([c.flatten().to_numpy() for c in got.column("cppo_reason").chunks])
    assert set(np.unique(reasons)) >= {0, 1, 2, 4}


def test_ray_bad_values_raise(tmp_path, local_ray):
    table = sample_table(64, 16, seed=1)
    lp = table.column("log_probs").combine_chunks()
    values = lp.values.to_numpy().copy()
    values[5] = 0.5  # a log-prob > 0 at a valid token
    table = table.set_column(1, "log_probs", pa.ListArray.from_arrays(lp.offsets, pa.array(values)))
    path = _write_dataset(tmp_path, table, files=2)
    ds = mask_dataset(ray.data.read_parquet(str(path)), **KNOBS)
    with pytest.raises(Exception, match=r"column 'log_probs' must be finite and <= 0 at valid tokens; got 0.5"):
        ds.materialize()


def test_mask_dataset_checks_knobs_before_running():
    with pytest.raises(ValueError, match="delta must be > 0"):
        mask_dataset(object(), delta=-1.0, delta_b=0.02)
    with pytest.raises(TypeError, match="unknown CPPO option"):
        mask_dataset(object(), delta=0.1, delta_b=0.02, deltaa=3)
    with pytest.raises(TypeError, match="columns must be"):
        mask_dataset(object(), columns={"log_probs": "x"}, delta=0.1, delta_b=0.02)
