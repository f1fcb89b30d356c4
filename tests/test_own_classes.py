"""A user's own model: a timm network fine-tuned on its own classes loads from its checkpoint,
and what is built from it (the house, its students) rebuilds with those classes."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def fine_tuned(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=7).eval()
    path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_a_checkpoint_of_other_classes_loads_with_its_own_classifier(fine_tuned):
    from bespoke.models import load_model, num_classes

    model, path = fine_tuned
    loaded = load_model("test_efficientnet", weights=str(path))
    assert num_classes(loaded) == 7
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert num_classes(load_model("test_efficientnet", weights=None, classes=7)) == 7
    assert num_classes(load_model("test_efficientnet", weights=None)) == 1000


def test_a_student_of_a_fine_tuned_teacher_reloads_with_its_classes(fine_tuned, tmp_path):
    from bespoke import load_student
    from bespoke.models import load_model
    from bespoke.partition import Partition
    from bespoke.stages.build import own_classes
    from bespoke.student import StudentRecipe, assemble, save_student

    _, path = fine_tuned
    teacher = load_model("test_efficientnet", weights=str(path))
    assert own_classes("test_efficientnet", teacher) == 7
    assert own_classes("test_efficientnet", load_model("test_efficientnet", weights=None)) is None
    student = assemble(Partition.from_model(teacher, (1, 3, 64, 64)), [])
    recipe = StudentRecipe(teacher="test_efficientnet", teacher_weights=str(path), input_size=(3, 64, 64),
                           num_classes=7)
    saved = save_student(student, recipe, tmp_path / "student")
    path.unlink()  # the student needs bespoke and its own files only, not the teacher's checkpoint
    again = load_student(saved)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert again(x).shape == (1, 7) and torch.allclose(again(x), teacher(x), atol=1e-6)
