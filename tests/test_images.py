"""Variation grids: layout arithmetic, exact nearest upscaling, the condition frame, labels."""
import numpy as np
import pytest

from semantica_jax import images

ORANGE = np.array(images.FRAME, np.uint8)
GREY = np.array(images.SEPARATOR, np.uint8)


def _inputs(n=3, m=4, size=8, cond_size=None, seed=0):
    """Conds in [0, 0.4] and samples in [-1, -0.1]: never white, grey or orange pixels."""
    rng = np.random.RandomState(seed)
    conds = rng.uniform(0.0, 0.4, (n, cond_size or size, cond_size or size, 3)).astype(np.float32)
    samples = rng.uniform(-1.0, -0.1, (n * m, size, size, 3)).astype(np.float32)
    return conds, samples


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def _is(grid, colour):
    return np.all(grid == colour, axis=-1)


def _blocks(grid):
    """(y0, y1, x0, x1) of the orange-framed condition column and of the grey-lined samples block."""
    y0, y1, x0, x1 = _bbox(_is(grid, ORANGE))
    sy0, sy1, sx0, sx1 = _bbox(_is(grid[y0:y1, x1:], GREY))  # below the (anti-aliased) header text
    return (y0, y1, x0, x1), (sy0 + y0, sy1 + y0, sx0 + x1, sx1 + x1)


def test_default_scale_gives_cells_of_at_least_96_px_and_at_least_3x():
    assert [images.default_scale(s) for s in (16, 28, 32, 64, 100)] == [6, 4, 3, 3, 3]


def test_grid_shape_arithmetic():
    size, scale, pad = 8, 5, 2
    step = size * scale + pad
    shape = lambda n, m, **kw: images.variation_grid(*_inputs(n, m, size), m, size, pad, scale=scale, **kw).shape
    h, w, c = shape(3, 4)
    assert c == 3
    assert shape(4, 4)[0] - h == step and shape(4, 4)[1] == w  # one more row
    assert shape(3, 5)[1] - w == step and shape(3, 5)[0] == h  # one more sample column
    grid = images.variation_grid(*_inputs(3, 4, size), 4, size, pad, scale=scale)
    assert grid.dtype == np.uint8
    (y0, y1, x0, x1), (sy0, sy1, sx0, sx1) = _blocks(grid)
    assert (y1 - y0, x1 - x0) == (3 * step + pad, step + pad)  # 3 cells tall, 1 wide, with the frame
    assert (sy0, sy1) == (y0, y1) and sx1 - sx0 == 4 * step + pad
    assert sx0 - x1 >= 3 * pad  # a clearly wider gap before the samples than between cells


def test_cells_are_exact_nearest_upscales():
    n, m, size, scale, pad = 2, 3, 8, 4, 2
    conds, samples = _inputs(n, m, size, cond_size=4)  # conds are first resized 4 -> 8, then x4
    grid = images.variation_grid(conds, samples, m, size, pad, scale=scale)
    cell, step = size * scale, size * scale + pad
    (y0, _, x0, _), (_, _, sx0, _) = _blocks(grid)
    for i in range(n):
        y = y0 + pad + i * step
        want = np.kron(images.to_uint8(conds[i], (0.0, 1.0)), np.ones((2 * scale, 2 * scale, 1), np.uint8))
        np.testing.assert_array_equal(grid[y : y + cell, x0 + pad : x0 + pad + cell], want)
        for j in range(m):
            x = sx0 + pad + j * step
            want = np.kron(images.to_uint8(samples[i * m + j]), np.ones((scale, scale, 1), np.uint8))
            np.testing.assert_array_equal(grid[y : y + cell, x : x + cell], want)


def test_condition_frame_is_only_around_the_condition_column():
    n, m, size, scale, pad = 3, 4, 8, 4, 2
    grid = images.variation_grid(*_inputs(n, m, size), m, size, pad, scale=scale)
    orange = _is(grid, ORANGE)
    y0, y1, x0, x1 = _bbox(orange)
    assert not orange[:, x1:].any() and not orange[:, :x0].any()
    box = grid[y0:y1, x0:x1]
    for ring in (box[:pad], box[-pad:], box[:, :pad], box[:, -pad:]):  # a full frame, pad px thick
        assert _is(ring, ORANGE).all()
    # the samples block is split by grey lines, not orange ones
    assert _is(grid[y0:y1, x1:], GREY).sum() > 0


def test_header_names_the_condition_and_the_variations():
    grid = images.variation_grid(*_inputs(2, 4, 8), 4, 8, scale=12)
    y0, _, x0, x1 = _bbox(_is(grid, ORANGE))
    header = grid[:y0]
    ink = ~_is(header, np.array(images.BACKGROUND, np.uint8))
    assert ink[:, x0:x1].any() and ink[:, x1 + images.COLUMN_GAP :].any()


def test_row_labels_add_a_label_column_with_text_in_every_row():
    n, m, size, scale, pad = 3, 2, 8, 6, 2
    conds, samples = _inputs(n, m, size)
    plain = images.variation_grid(conds, samples, m, size, pad, scale=scale)
    short = images.variation_grid(conds, samples, m, size, pad, scale=scale, row_labels=["a", "b", "c"])
    long = images.variation_grid(conds, samples, m, size, pad, scale=scale,
                                 row_labels=["T-shirt/top", "Trouser", "Ankle boot"])
    assert plain.shape[0] == short.shape[0] == long.shape[0]
    assert plain.shape[1] < short.shape[1] < long.shape[1]
    white = np.array(images.BACKGROUND, np.uint8)
    _, _, px0, _ = _bbox(_is(plain, ORANGE))
    assert _is(plain[:, :px0], white).all()  # no label column without labels
    y0, _, x0, _ = _bbox(_is(long, ORANGE))
    step = size * scale + pad
    for i in range(n):
        band = long[y0 + pad + i * step : y0 + (i + 1) * step, :x0]
        assert (~_is(band, white)).any(), f"row {i} has no label"
    # everything right of the label column is the same picture as without labels
    np.testing.assert_array_equal(long[y0:, x0:], plain[y0:, px0:])
    with pytest.raises(ValueError, match="row labels"):
        images.variation_grid(conds, samples, m, size, row_labels=["a"])


def test_wrong_sample_count_raises():
    conds, samples = _inputs(2, 3, 8)
    with pytest.raises(ValueError, match="5 samples for 2 conditions x 3"):
        images.variation_grid(conds, samples[:5], 3, 8)


def test_class_names_for_maps_label_groups():
    names = ("T-shirt/top", "Trouser", "Pullover")
    assert images.class_names_for(["label 1", "label 7", "page 3"], names) == ["Trouser", "label 7", "page 3"]
    assert images.class_names_for(["label 0"], None) == ["label 0"]
