"""Teacher training: resuming equals not stopping; metrics."""

import jax
import numpy as np
import optax
import pytest

from nettransplant.core import evaluation, modules
from nettransplant.training import teachers


@pytest.fixture(scope="module")
def setup():
    teacher = modules.make_teacher(width=1 / 16, input_size=32)
    rng = np.random.default_rng(0)
    arrays = dict(cls_images=rng.normal(size=(40, 32, 32, 3)).astype(np.float32),
                  cls_labels=rng.integers(0, 2, 40),
                  seg_images=rng.normal(size=(40, 32, 32, 3)).astype(np.float32),
                  seg_masks=rng.integers(0, 2, (40, 32, 32)).astype(np.int32))
    return teacher, arrays


def _train(teacher, arrays, state, num_steps, optimizer):
    return teachers.train_teacher(teacher, state, optimizer=optimizer, num_steps=num_steps,
                                  batch_size=8, seg_batch_size=4, seed=3, progress=False,
                                  **arrays)[0]


def test_classification_and_segmentation_batches_have_their_own_sizes(setup):
    teacher, arrays = setup
    shapes = []

    def recording_step(state, key, cls_images, cls_labels, seg_images, seg_masks):
        shapes.append((cls_images.shape, cls_labels.shape, seg_images.shape, seg_masks.shape))
        return state, {"finite": True, "loss": 0.0}

    state = teachers.TrainState(np.int32(0), None, None)
    for seg_batch_size, expected in ((None, 8), (4, 4)):
        shapes.clear()
        teachers.train_teacher(teacher, state, optimizer=None, num_steps=2, batch_size=8,
                               seg_batch_size=seg_batch_size, seed=0, progress=False,
                               step_fn=recording_step, **arrays)
        assert shapes == [((8, 32, 32, 3), (8,), (expected, 32, 32, 3), (expected, 32, 32))] * 2


def test_a_set_smaller_than_a_batch_repeats_its_real_rows_only(setup):
    teacher, arrays = setup
    small = {k: v[:3] for k, v in arrays.items()}  # 3 images, batches of 8 and 4
    seen = []

    def recording_step(state, key, cls_images, cls_labels, seg_images, seg_masks):
        seen.append((cls_images, seg_masks))
        return state, {"finite": True, "loss": 0.0}

    state = teachers.TrainState(np.int32(0), None, None)
    teachers.train_teacher(teacher, state, optimizer=None, num_steps=3, batch_size=8,
                           seg_batch_size=4, seed=0, progress=False, step_fn=recording_step,
                           **small)
    for cls_images, seg_masks in seen:
        assert cls_images.shape[0] == 8 and seg_masks.shape[0] == 4
        rows = {int(np.flatnonzero((small["cls_images"] == im).all(axis=(1, 2, 3)))[0])
                for im in cls_images}
        assert rows == {0, 1, 2}  # every real row, repeated, nothing else
    empty = {k: v[:0] for k, v in arrays.items()}
    with pytest.raises(ValueError, match="needs training images"):
        teachers.train_teacher(teacher, state, optimizer=None, num_steps=1, batch_size=8,
                               seed=0, progress=False, step_fn=recording_step, **empty)


def test_resumed_teacher_training_ends_with_the_same_parameters(setup):
    teacher, arrays = setup
    optimizer = optax.adam(1e-3)

    def fresh():
        return teachers.create_teacher_state(teacher, jax.random.key(0), 32, optimizer)

    straight = _train(teacher, arrays, fresh(), 6, optimizer)
    halfway = _train(teacher, arrays, fresh(), 3, optimizer)
    assert int(halfway.step) == 3
    resumed = _train(teacher, arrays, halfway, 6, optimizer)
    assert int(resumed.step) == 6
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    scores = teachers.classification_scores(teacher, resumed.params, arrays["cls_images"][:4])
    assert scores.shape == (4, 1, 1, 1)
    seg = teachers.segmentation_scores(teacher, resumed.params, arrays["seg_images"][:4])
    assert seg.shape == (4, 32, 32, 2)


def test_metrics_are_percentages_with_clear_errors():
    labels = np.array([1, 0, 1, 1])
    scores = np.array([2.0, -1.0, -0.5, 3.0]).reshape(4, 1, 1, 1)
    predicted = np.asarray(evaluation.predict_classes(scores))
    assert evaluation.classification_error(predicted, labels) == 25.0
    masks = np.zeros((2, 4, 4), np.int64)
    assert evaluation.pixel_accuracy(np.zeros_like(masks), masks) == 100.0
    with pytest.raises(ValueError, match="differ"):
        evaluation.pixel_accuracy(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    applied = evaluation.batched_apply(lambda x: x * 2, np.arange(10.0), batch_size=4)
    np.testing.assert_array_equal(applied, np.arange(10.0) * 2)
