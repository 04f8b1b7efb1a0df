"""The adherence evaluator on images with known answers: clean renders from the dataset generator, renders
with a wrong caption (each wrong attribute costs exactly its check), softened renders, and empty images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageFilter

from evaluation.adherence import analyse, colour_share, score_image, summarise
from training.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    held_out_captions,
    is_held_out,
    parse_caption,
    render,
    render_batch,
)


def _scene_render(scene: Scene, seed: int = 0) -> np.ndarray:
    return render(scene, np.random.default_rng(seed))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", list(SIZES))
def test_every_shape_and_size_is_recognised_at_every_corner_and_centre(shape, size):
    for i, position in enumerate(("top left", "bottom right", "center", "top right", "bottom left")):
        scene = Scene((ShapeObject(shape, "purple", size, position),), "yellow")
        background, objects = analyse(_scene_render(scene, seed=i))
        assert background == "yellow"
        found = objects["purple"]
        assert (found.shape, found.size, found.position) == (shape, size, position), found


def test_random_scenes_from_the_generator_score_perfectly():
    images, captions = render_batch(seed=11, index=0, count=60)
    results = [score_image(img, cap) for img, cap in zip(images, captions, strict=True)]
    summary = summarise(results)
    assert summary["adherence"] == 1.0, [r.caption for r in results if not r.exact]
    assert summary["extra_objects"] == 0.0


def test_each_wrong_attribute_costs_exactly_its_check():
    scene = Scene((ShapeObject("star", "red", "large", "top left"),
                   ShapeObject("square", "blue", "small", "bottom right")), "white")
    image = _scene_render(scene)
    total = 4 * 2 + 1
    first = scene.objects[0]
    wrong = {
        "shape": dataclasses.replace(first, shape="circle"),
        "size": dataclasses.replace(first, size="small"),
        "position": dataclasses.replace(first, position="center"),
    }
    assert score_image(image, scene.caption()).score == 1.0
    for attribute, obj in wrong.items():
        caption = Scene((obj, scene.objects[1]), scene.background).caption()
        result = score_image(image, caption)
        assert result.score == pytest.approx((total - 1) / total), attribute
    absent_colour = Scene((dataclasses.replace(first, colour="green"), scene.objects[1]), "white").caption()
    assert score_image(image, absent_colour).score == pytest.approx((total - 4) / total)
    wrong_background = Scene(scene.objects, "black").caption()
    assert score_image(image, wrong_background).score == pytest.approx((total - 1) / total)


def test_an_empty_background_only_earns_the_background_check():
    caption = "a small red circle at the top left and a blue square on the right, on a yellow background"
    image = np.zeros((128, 128, 3), dtype=np.uint8) + np.array(COLOURS["yellow"], dtype=np.uint8)
    result = score_image(image, caption)
    assert result.background_ok and not any(c.colour_ok for c in result.checks)
    assert result.score == pytest.approx(1 / 9)
    assert colour_share(image, "yellow") == 1.0 and colour_share(image, "red") == 0.0


def test_softened_and_resized_renders_are_still_read_correctly():
    """Generated images are softer than the renders (8x latent); the evaluator must not depend on crisp edges."""
    images, captions = render_batch(seed=12, index=0, count=30)
    scores = []
    for img, cap in zip(images, captions, strict=True):
        soft = Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.2)).resize((256, 256))
        scores.append(score_image(soft, cap).score)
    assert np.mean(scores) >= 0.95


def test_caption_grammar_round_trips_and_rejects_other_text():
    _, captions = render_batch(seed=13, index=0, count=100)
    assert all(parse_caption(c).caption() == c for c in captions)
    with pytest.raises(ValueError, match="background"):
        parse_caption("a red circle at the top left")
    with pytest.raises(ValueError, match="a red blob"):
        parse_caption("a red blob at the top left, on a blue background")
    with pytest.raises(ValueError, match="teal"):
        parse_caption("a red circle at the top left, on a teal background")


def test_held_out_captions_never_appear_in_training_chunks():
    held = held_out_captions(50)
    assert len(set(held)) == 50 and all(is_held_out(c) for c in held)
    _, captions = render_batch(seed=0, index=3, count=200)
    assert not any(is_held_out(c) for c in captions)
    assert not set(held) & set(captions)


def test_dataset_chunks_are_reproducible_and_well_formed():
    a_images, a_captions = render_batch(seed=5, index=2, count=8)
    b_images, b_captions = render_batch(seed=5, index=2, count=8)
    assert a_captions == b_captions and np.array_equal(a_images, b_images)
    assert a_images.shape == (8, 128, 128, 3) and a_images.dtype == np.uint8
    for caption in a_captions:
        scene = parse_caption(caption)
        colours = [o.colour for o in scene.objects] + [scene.background]
        assert len(set(colours)) == len(colours)  # every object has its own colour, unlike the background
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        assert all(o.position in POSITIONS for o in scene.objects)
