"""The torch Canny detector on shapes whose edges are known."""

from __future__ import annotations

import pytest
import torch

from fluxworks.flux_controlnet import canny_edges


def square_image(size: int = 64, lo: int = 20, hi: int = 44, value: float = 1.0) -> torch.Tensor:
    image = torch.zeros(1, size, size, 3)
    image[:, lo:hi, lo:hi] = value
    return image


def test_a_square_gives_a_closed_one_pixel_outline():
    edges = canny_edges(square_image(), 0.1, 0.2)[0]
    assert edges.shape == (64, 64)
    ys, xs = torch.nonzero(edges, as_tuple=True)
    assert ys.min() >= 18 and ys.max() <= 45 and xs.min() >= 18 and xs.max() <= 45  # only at the boundary
    assert edges[:17].sum() == 0 and edges[22:42, 22:42].sum() == 0  # nothing in flat regions
    for row in range(24, 40):  # away from the corners each row crosses the outline exactly twice
        assert edges[row].sum() == 2
    for column in range(24, 40):
        assert edges[:, column].sum() == 2
    blocks = edges[:-1, :-1] + edges[1:, :-1] + edges[:-1, 1:] + edges[1:, 1:]
    assert blocks.max() <= 3  # thin: no 2 x 2 block of edge pixels


def test_edges_are_white_on_black_in_the_image_dtype():
    edges = canny_edges(square_image().double(), 0.1, 0.2)
    assert edges.dtype == torch.float64
    assert set(edges.unique().tolist()) == {0.0, 1.0}


def test_a_flat_or_faint_image_has_no_edges():
    assert canny_edges(torch.full((1, 32, 32, 3), 0.5), 0.1, 0.2).sum() == 0
    assert canny_edges(square_image(value=0.05), 0.1, 0.2).sum() == 0  # contrast below the low threshold


def test_hysteresis_keeps_weak_edges_connected_to_strong_ones():
    """A weak step (0 -> 0.35) that a strong patch (1.0) sits on, and a weak rectangle (+0.3) far from it."""
    image = torch.zeros(1, 64, 64, 3)
    image[:, 4:60, 16:] = 0.35
    image[:, 4:20, 16:24] = 1.0
    image[:, 30:50, 44:54] += 0.3
    kept = canny_edges(image, 0.15, 0.5, blur_sigma=0.0)[0]
    strong_only = canny_edges(image, 0.5, 0.5, blur_sigma=0.0)[0]
    assert strong_only[24:56, 14:18].sum() == 0  # the weak step alone is below the high threshold
    assert kept[24:56, 14:18].sum() >= 30  # ... but hysteresis follows it down from the strong patch
    assert kept[26:54, 40:58].sum() == 0  # the isolated weak rectangle is dropped
    assert canny_edges(image, 0.15, 0.15, blur_sigma=0.0)[0, 26:54, 40:58].sum() > 0  # it is a weak edge


@pytest.mark.parametrize("low,high,sigma", [(0.3, 0.2, 1.0), (-0.1, 0.2, 1.0), (0.1, 0.2, -1.0)])
def test_bad_parameters_are_refused(low, high, sigma):
    with pytest.raises(ValueError):
        canny_edges(square_image(), low, high, sigma)


def test_edges_between_colours_of_equal_brightness_are_found():
    image = torch.empty(1, 32, 32, 3)
    image[:, :, :16] = torch.tensor([0.7, 0.3, 0.5])
    image[:, :, 16:] = torch.tensor([0.3, 0.7, 0.5])  # same channel mean, different colour
    edges = canny_edges(image, 0.1, 0.2)[0]
    assert torch.all(edges[:, 15:17].sum(dim=1) == 1)  # one edge pixel on every row, at the boundary
    assert edges.sum() == 32


def test_an_interrupt_stops_hysteresis():
    """Hysteresis grows edges a pixel per pass (thousands of passes on a long edge of a large image): the cancel
    check runs between passes."""
    class Cancelled(Exception):
        pass

    def interrupt():
        raise Cancelled

    with pytest.raises(Cancelled):
        canny_edges(square_image(), 0.1, 0.2, interrupt=interrupt)
    assert torch.equal(canny_edges(square_image(), 0.1, 0.2, interrupt=lambda: None),
                       canny_edges(square_image(), 0.1, 0.2))
