"""The pod plan's arithmetic (semantica_jax/hardware.py) on fixed cost-model inputs.

The numbers are worked by hand from the ring formulas and the vendor figures in hardware.CHIPS;
docs/SCALE.md quotes the same model. No JAX: the plan's compiles are tested in test_scale.py.
"""
import math

import pytest

from semantica_jax import hardware

V5E, V4, V5P, H100 = (hardware.CHIPS[k] for k in ("v5e", "v4", "v5p", "h100"))
S_PARAMS = 85_500_000  # the base config's S denoiser


def test_chip_figures_are_the_documented_ones():
    assert V5E.ici_bytes_per_s == pytest.approx(51.2e12 / 256)  # the pod's all-reduce bandwidth per chip
    assert V5E.dcn_bytes_per_s == pytest.approx(25e9 / 8)  # 6.4 Tbps per 256-chip pod
    assert V4.ici_bytes_per_s == pytest.approx(268.55e9, rel=1e-4) and V4.dcn_bytes_per_s is None
    assert (V5P.ici_bytes_per_s, V5P.dcn_bytes_per_s) == (600e9, 6.25e9)
    assert (H100.ici_bytes_per_s, H100.dcn_bytes_per_s) == (450e9, 50e9)
    assert all(c.source for c in hardware.CHIPS.values())


def test_data_parallel_all_reduce_on_a_v5e_pod():
    (ar,) = hardware.gradient_collectives(S_PARAMS, ici={"data": 256, "fsdp": 1, "model": 1})
    assert (ar.kind, ar.bytes, ar.ici_group, ar.dcn_group) == ("all-reduce", 4 * S_PARAMS, 256, 1)
    ici, dcn = ar.seconds(V5E)
    assert ici == pytest.approx(2 * 255 / 256 * 342e6 / 200e9)  # 3.41 ms
    assert dcn == 0.0
    # One example per chip: 0.332 TFLOP (the compiled base step) at half the peak = 3.37 ms of
    # compute, less than the all-reduce: communication-bound, as docs/SCALE.md says.
    one = hardware.estimate_step(V5E, flops_per_device=0.332e12, batch_per_device=1, collectives=[ar])
    assert one.compute_s == pytest.approx(0.332e12 / (197e12 * 0.5))
    assert one.bound == "communication" and one.step_s == pytest.approx(one.comm_s)
    four = hardware.estimate_step(V5E, flops_per_device=4 * 0.28e12, batch_per_device=4, collectives=[ar])
    assert four.bound == "compute" and four.comm_s / four.compute_s == pytest.approx(0.30, abs=0.01)
    assert four.examples_per_s == pytest.approx(4 / four.compute_s)
    assert four.chip_hours_per_budget == pytest.approx(1e8 / four.examples_per_s / 3600)


def test_fsdp_with_remat_and_data_parallel_across_slices():
    colls = hardware.gradient_collectives(
        1_000_000_000, ici={"data": 1, "fsdp": 256, "model": 1}, dcn={"data": 2, "fsdp": 1, "model": 1},
        remat=True)
    assert [c.kind for c in colls] == ["reduce-scatter", "all-gather", "all-gather", "all-reduce"]
    rs, ag, _, ar = colls
    assert rs.seconds(V5E) == (pytest.approx(255 / 256 * 4e9 / 200e9), 0.0)
    # Across the 2 slices each chip all-reduces its 1/256 shard of the gradient over DCN.
    assert ar.bytes == pytest.approx(4e9 / 256) and (ar.ici_group, ar.dcn_group) == (1, 2)
    assert ar.seconds(V5E) == (0.0, pytest.approx(2 * 1 / 2 * (4e9 / 256) / 3.125e9))
    est = hardware.estimate_step(V5E, flops_per_device=1e12, batch_per_device=1, collectives=colls)
    assert est.ici_s == pytest.approx(3 * 255 / 256 * 4e9 / 200e9)
    assert est.dcn_s == pytest.approx(5e-3)
    with pytest.raises(ValueError, match="v4: no documented DCN bandwidth"):
        ar.seconds(V4)


def test_model_axis_shards_the_gradient_and_one_device_communicates_nothing():
    (ar,) = hardware.gradient_collectives(1000, ici={"data": 4, "fsdp": 1, "model": 2})
    assert ar.bytes == 2000
    assert hardware.gradient_collectives(1000, ici={"data": 1, "fsdp": 1, "model": 1}) == []
    with pytest.raises(ValueError, match="mfu=0"):
        hardware.estimate_step(V5E, flops_per_device=1.0, batch_per_device=1, collectives=[], mfu=0)
    # Compiled collectives: all-reduce 2x its result, all-gather 1x, reduce-scatter x (devices - 1).
    compiled = {"all-reduce": [3, 1e9], "all-gather": [10, 2e9], "reduce-scatter": [1, 1e6]}
    assert hardware.compiled_collective_seconds(compiled, V5E, 256) == pytest.approx(
        (2e9 + 2e9 + 255e6) / 200e9)


def test_linear_fit_batch_list_and_recommendation():
    mem = hardware.Linear.fit([(1, 2.0), (4, 5.0)])
    assert (mem.intercept, mem.slope) == (pytest.approx(1.0), pytest.approx(1.0))
    assert mem.largest_x(0.8 * 16) == pytest.approx(11.8)
    assert hardware.Linear(3.0, 0.0).largest_x(2.0) == -math.inf
    with pytest.raises(ValueError, match="two batch sizes"):
        hardware.Linear.fit([(2, 1.0), (2, 1.5)])
    assert hardware.powers_of_two(11.8) == [1, 2, 4, 8]
    (ar,) = hardware.gradient_collectives(S_PARAMS, ici={"data": 256})
    est = [hardware.estimate_step(V5E, flops_per_device=b * 0.28e12, batch_per_device=b, collectives=[ar])
           for b in (1, 2, 4, 8)]
    assert [e.bound for e in est] == ["communication"] * 2 + ["compute"] * 2
    assert hardware.recommend(est, [True] * 4) is est[2]  # the smallest compute-bound batch
    assert hardware.recommend(est, [True, True, False, False]) is est[1]  # else the largest that fits
    assert hardware.recommend(est, [False] * 4) is None
    # A step must also compute for MIN_STEP_S (10 ms): 4 x 2.84 ms passes, 2 x 2.84 ms would not.
    assert est[2].compute_s >= hardware.MIN_STEP_S > est[1].compute_s
    assert hardware.recommend(est, [True] * 4, min_compute_s=0.02) is est[3]


def _compiled(batch, peak_gib, tflops, devices=256):
    """A stand-in for one of launch/compile_for.py's Reports (the fields build_plan reads)."""
    import types

    return types.SimpleNamespace(
        global_batch=batch * devices, devices=devices, mesh={"data": devices, "fsdp": 1, "model": 1},
        ici={"data": devices, "fsdp": 1, "model": 1}, dcn={"data": 1, "fsdp": 1, "model": 1},
        params=S_PARAMS, remat=False, grad_bytes=2, usable_bytes=16 * hardware.GIB,
        peak_bytes=peak_gib * hardware.GIB, flops_compiled=tflops * 1e12, flops_program=None,
        collectives={"all-reduce": [3, 2.0 * S_PARAMS]})


def test_plan_from_compiles_at_two_batches():
    # The base config's v5e-256 compiles (docs/SCALE.md): 1.98 GiB / 0.332 TFLOP at 1 per chip,
    # 2.55 GiB / 1.324 TFLOP at 4.
    plan = hardware.build_plan("v5e-256", V5E, {1: _compiled(1, 1.98, 0.332), 4: _compiled(4, 2.55, 1.324)},
                               config_batch=1024)
    # Memory grows 0.19 GiB per example: 12.8 GiB (80 % of 16) is reached at ~57 per chip.
    assert [r.batch_per_device for r in plan.rows] == [1, 2, 4, 8, 16, 32]
    assert [r.compiled for r in plan.rows] == [True, False, True, False, False, False]
    assert plan.rows[1].peak_bytes == pytest.approx((1.98 + (2.55 - 1.98) / 3) * hardware.GIB)
    (ar,) = plan.collectives
    assert ar.bytes == 2 * S_PARAMS  # bfloat16 gradients, as the compiled program reduces them
    first = plan.rows[0].estimate
    assert first.bound == "communication" and first.ici_s == pytest.approx(2 * 255 / 256 * 171e6 / 200e9, rel=1e-3)
    # The compiled program's all-reduces (171 MB) at the large-group factor 2: a hair more, and the larger counts.
    assert first.compiled_comm_s == pytest.approx(2 * 2.0 * S_PARAMS / 200e9)
    assert first.comm_s == first.compiled_comm_s > first.ici_s
    # 2 per chip is compute-bound but computes 6.7 ms < 10 ms; 4 per chip (13.4 ms) is recommended.
    assert plan.rows[1].estimate.bound == "compute" and plan.rows[1].estimate.compute_s < hardware.MIN_STEP_S
    assert plan.recommended.batch_per_device == 4 and plan.recommended.global_batch == 1024
    assert plan.config_row() is plan.recommended
    assert "data-parallel over 256" in plan.text() and "compiled program: all-reduce 171 MB in 3 ops" in plan.text()
    assert plan.markdown_row().startswith("| v5e-256 | data-parallel over 256 | 4 (1024) | 2.55 / 16.00 |")
    with pytest.raises(RuntimeError, match="fits at fewer than two"):
        hardware.build_plan("v5e-256", V5E, {1: _compiled(1, 1.98, 0.332)}, config_batch=256)
