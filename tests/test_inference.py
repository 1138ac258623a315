"""cvt.pipeline("image-classification"): the same numbers as model(processor(images)), batch-invariant,
eval mode without gradients, on the chosen device, with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data
from sklearn.datasets import load_sample_image

import cvt
from conftest import TINY_LABELS, save_tiny_classifier, tiny_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-classifier"))


@pytest.fixture(scope="module")
def images() -> list:
    """Real photographs of different shapes, as different kinds of input."""
    rgba = np.dstack([skimage_data.astronaut(), np.full((512, 512), 200, np.uint8)])
    return [skimage_data.chelsea(), Image.fromarray(skimage_data.coffee()), load_sample_image("china.jpg"),
            Image.fromarray(rgba), torch.from_numpy(skimage_data.rocket().transpose(2, 0, 1).copy())]


def reference_scores(folder, images) -> torch.Tensor:
    """Softmax of the model's logits on the processor's output, loaded independently of the pipeline."""
    model = cvt.CvtForImageClassification.from_pretrained(folder)
    processor = cvt.CvtImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        return model(processor(images)["pixel_values"]).logits.softmax(-1)


def test_top1_is_the_argmax_of_the_model_on_the_processor_output(folder, images) -> None:
    classifier = cvt.pipeline("image-classification", model=folder, top_k=len(TINY_LABELS))
    results = classifier(images)
    expected = reference_scores(folder, images)
    assert len(results) == len(images)
    top1 = [TINY_LABELS[i] for i in expected.argmax(-1).tolist()]
    assert [r[0]["label"] for r in results] == top1
    assert len(set(top1)) > 1  # the randomised model tells the photographs apart
    for result, scores in zip(results, expected):
        assert [p["label"] for p in result] == [TINY_LABELS[i] for i in scores.argsort(descending=True)]
        # softmax / sigmoid scores: 1 is their scale
        torch.testing.assert_close(torch.tensor([p["score"] for p in result]),
                                   scores.sort(descending=True).values, atol=1e-6, rtol=0)


def test_batches_give_the_one_by_one_results(folder, images, tmp_path) -> None:
    classifier = cvt.pipeline("image-classification", model=folder, top_k=3)
    one_by_one = [classifier(image) for image in images]
    for batch_size in (2, 5):
        batched = classifier(images, batch_size=batch_size)
        for alone, together in zip(one_by_one, batched):
            assert [p["label"] for p in alone] == [p["label"] for p in together]
            # softmax scores: 1 is their scale
            np.testing.assert_allclose([p["score"] for p in alone], [p["score"] for p in together], atol=1e-5)
    paths = []
    for i, image in enumerate(images[:3]):
        paths.append(tmp_path / f"{i}.png")
        (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(paths[-1])
    from_files = [r for _, r in classifier.classify_files(paths, batch_size=2)]
    for alone, from_file in zip(one_by_one, from_files):
        # softmax / sigmoid scores: 1 is their scale
        np.testing.assert_allclose([p["score"] for p in alone], [p["score"] for p in from_file], atol=1e-5)


def test_one_image_gives_a_list_a_list_gives_lists_top_k_is_capped(folder, images) -> None:
    classifier = cvt.pipeline("image-classification", model=folder)
    single = classifier(images[0], top_k=2)
    assert [set(p) for p in single] == [{"label", "score"}] * 2
    assert single[0]["score"] >= single[1]["score"]
    assert len(classifier([images[0]])) == 1 and len(classifier([images[0]])[0]) == len(TINY_LABELS)
    everything = classifier(images[0], top_k=1000)  # more than there are labels: all of them
    assert sorted(p["label"] for p in everything) == sorted(TINY_LABELS)
    # softmax / sigmoid scores: 1 is their scale
    assert abs(sum(p["score"] for p in everything) - 1) < 1e-5


def test_runs_an_engine_of_the_eval_mode_model_without_gradients(folder, images) -> None:
    model = cvt.CvtForImageClassification.from_pretrained(folder).train()
    classifier = cvt.pipeline("image-classification", model=model, engine="torch",
                              image_processor=cvt.CvtImageProcessor.from_pretrained(folder))
    assert not model.training and classifier.engine.name == "torch"
    seen = []
    model.register_forward_hook(lambda *args: seen.append(args))
    with torch.no_grad():
        want = model(classifier.image_processor(images[:2])["pixel_values"]).logits.softmax(-1)
    seen.clear()
    scores = [[p["score"] for p in r] for r in classifier(images[:2], top_k=5)]
    assert seen == []  # the engine ran, not model(x)
    # softmax / sigmoid scores: 1 is their scale
    np.testing.assert_allclose(scores, want.sort(-1, descending=True).values.numpy(), atol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_the_device_is_the_one_chosen(folder, images) -> None:
    on_cpu = cvt.pipeline("image-classification", model=folder, device="cpu")
    assert on_cpu.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in on_cpu.model.parameters())
    if torch.cuda.is_available():
        on_gpu = cvt.pipeline("image-classification", model=folder, device="cuda")
        assert all(p.device.type == "cuda" for p in on_gpu.model.parameters())
        # softmax / sigmoid scores: 1 is their scale
        np.testing.assert_allclose([p["score"] for p in on_gpu(images[0])],
                                   [p["score"] for p in on_cpu(images[0])], atol=1e-4)
    else:
        with pytest.raises(ValueError, match="CUDA is not available"):
            cvt.pipeline("image-classification", model=folder, device="cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        cvt.pipeline("image-classification", model=folder, device="gpu0")


def test_multi_label_models_score_each_class_with_a_sigmoid(folder, images) -> None:
    model = cvt.CvtForImageClassification.from_pretrained(folder, problem_type="multi_label_classification")
    processor = cvt.CvtImageProcessor.from_pretrained(folder)
    result = cvt.pipeline("image-classification", model=model, image_processor=processor, top_k=5,
                          engine="torch")(images[0])  # the scoring is under test, not an engine build
    with torch.no_grad():
        logits = model(processor(images[0])["pixel_values"]).logits[0]
    expected = logits.sigmoid().sort(descending=True).values
    # softmax / sigmoid scores: 1 is their scale
    torch.testing.assert_close(torch.tensor([p["score"] for p in result]), expected, atol=1e-6, rtol=0)


def test_bad_files_raise_in_a_call_and_are_reported_by_classify_files(folder, images, tmp_path) -> None:
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    Image.fromarray(skimage_data.chelsea()).save(good)
    bad.write_text("not a jpeg")
    classifier = cvt.pipeline("image-classification", model=folder)
    with pytest.raises(cvt.ImageError, match="bad.jpg: not an image file"):
        classifier([good, bad])
    results = list(classifier.classify_files([bad, good, bad], batch_size=1))
    assert [path for path, _ in results] == [bad, good, bad]
    assert isinstance(results[0][1], cvt.ImageError) and isinstance(results[2][1], cvt.ImageError)
    assert results[1][1] == classifier(good)


def test_clear_errors_for_what_cannot_work(folder, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown task 'object-detection'"):
        cvt.pipeline("object-detection", model=folder)
    cvt.CvtForImageClassification(tiny_config()).save_pretrained(tmp_path)  # weights, no processor
    with pytest.raises(cvt.CheckpointError, match="has no preprocessor_config.json"):
        cvt.pipeline("image-classification", model=tmp_path)
    with pytest.raises(ValueError, match="pass image_processor="):
        cvt.pipeline("image-classification", model=cvt.CvtForImageClassification(tiny_config()))
    with pytest.raises(TypeError, match="CvtForImageClassification"):
        cvt.pipeline("image-classification", model=cvt.CvtModel(tiny_config()),
                     image_processor=cvt.CvtImageProcessor())
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        cvt.pipeline("image-classification", model=folder, top_k=0)
